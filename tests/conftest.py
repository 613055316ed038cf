"""Session-wide fixtures: one real Prefect server for the whole test run, in a temp home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from infra import prefect_server
from tests.aws import FAKE_AWS_ENV

# Before anything imports Prefect: a private home, no analytics, and the API URL of the
# server the `prefect_api` fixture starts (Prefect reads its settings once, at import).
_HOME = Path(tempfile.mkdtemp(prefix="tierflow-tests-"))
_PORT = prefect_server.free_port("127.0.0.1")
os.environ["TIERFLOW_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "client")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real ``prefect server`` on 127.0.0.1, started once, stopped (SIGTERM) at the end."""
    info = prefect_server.start(port=_PORT)
    assert info.api_url == os.environ["PREFECT_API_URL"], "the port was taken before the server started"
    yield info.api_url
    _flush_prefect_logs()
    prefect_server.stop()


def _flush_prefect_logs() -> None:
    """Send the last run logs while the server is still there (else Prefect reports a failed send)."""
    import logging

    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, APILogHandler)}:
        handler.flush()


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's real S3 server on a free 127.0.0.1 port, with fake credentials in the env (which
    processes started meanwhile inherit)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_AWS_ENV.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "TIERFLOW_S3_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


# --- time per tests/NAME/ folder, printed at the end of the run ---------------------------------

_FOLDER_SECONDS: dict[str, float] = {}
_FOLDER_TESTS: dict[str, int] = {}


def _folder(nodeid: str) -> str:
    parts = nodeid.split("::")[0].split("/")
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else parts[0]


def pytest_runtest_logreport(report) -> None:
    """Setup, call and teardown of every test, added up per folder (module fixtures count where they run)."""
    folder = _folder(report.nodeid)
    _FOLDER_SECONDS[folder] = _FOLDER_SECONDS.get(folder, 0.0) + report.duration
    if report.when == "call":
        _FOLDER_TESTS[folder] = _FOLDER_TESTS.get(folder, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FOLDER_SECONDS:
        return
    terminalreporter.section("time per folder")
    total = sum(_FOLDER_SECONDS.values())
    for folder, seconds in sorted(_FOLDER_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {100 * seconds / total:5.1f}%  {_FOLDER_TESTS.get(folder, 0):4d} tests  "
                                    f"{folder}")
    terminalreporter.write_line(f"{total:8.1f} s  total in tests (the session's server start included where it ran)")
