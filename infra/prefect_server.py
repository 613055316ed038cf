"""A real, local Prefect server that tierflow starts once and every run reuses.

Prefect's temporary per-process server costs 15–25 s a process here and, with Dask,
starts one per worker; so tierflow keeps one ``prefect server`` on 127.0.0.1 and points
``PREFECT_API_URL`` at it. Its state (pid, port, log, SQLite database) lives in
``$TIERFLOW_HOME`` (default ``~/.tierflow``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PORT = 4200
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false"}


def tierflow_home() -> Path:
    return Path(os.environ.get("TIERFLOW_HOME", Path.home() / ".tierflow"))


@dataclass
class ServerInfo:
    pid: int
    host: str
    port: int
    home: str
    log: str

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _state_file() -> Path:
    return tierflow_home() / "prefect-server.json"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running() -> ServerInfo | None:
    """The server tierflow started, if it is still up and healthy."""
    try:
        info = ServerInfo(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if _pid_alive(info.pid) and healthy(info.api_url):
        return info
    return None


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 120.0) -> ServerInfo:
    """Start ``prefect server`` in the background (or return the one already up)."""
    current = running()
    if current is not None:
        return current
    if not _port_free(host, port):
        port = free_port(host)
    home = tierflow_home()
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    log_path = home / "prefect-server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(QUIET_ENV)
    env.update({
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_UI_API_URL": f"http://{host}:{port}/api",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
    })
    prefect = Path(sys.executable).with_name("prefect")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port), "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    info = ServerInfo(pid=process.pid, host=host, port=port, home=str(home / "prefect"), log=str(log_path))
    deadline = time.monotonic() + timeout
    try:
        while not healthy(info.api_url):
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer within {timeout:.0f} s; see {log_path}")
            time.sleep(0.5)
    except BaseException:  # Ctrl-C or a failed start: leave no server behind holding the port
        _terminate(process.pid)
        raise
    _state_file().write_text(json.dumps(asdict(info)))
    return info


def _terminate(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop() -> bool:
    """Stop the server tierflow started; False if none was recorded."""
    try:
        info = ServerInfo(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return False
    _state_file().unlink(missing_ok=True)
    if not _is_prefect_server(info.pid):
        return False  # stale record: the pid is gone or now belongs to another program
    _terminate(info.pid)
    return True


def _is_prefect_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return _pid_alive(pid)  # no /proc here: trust the record
    return b"prefect" in cmdline and b"server" in cmdline


def ensure_api() -> str:
    """Make sure ``PREFECT_API_URL`` points at a healthy server, starting ours if needed."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured and healthy(configured):
        os.environ.update(QUIET_ENV)
        return configured
    info = start()
    os.environ["PREFECT_API_URL"] = info.api_url
    os.environ.update(QUIET_ENV)
    return info.api_url
