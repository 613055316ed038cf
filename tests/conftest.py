"""Session-wide fixtures: one real Prefect server for the whole test run, in a temp home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: a private home, no analytics, no stray server.
_HOME = Path(tempfile.mkdtemp(prefix="tierflow-tests-"))
os.environ["TIERFLOW_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "client")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real ``prefect server`` on 127.0.0.1, started once, stopped (SIGTERM) at the end."""
    from infra import prefect_server

    info = prefect_server.start(port=prefect_server.free_port("127.0.0.1"))
    os.environ["PREFECT_API_URL"] = info.api_url
    yield info.api_url
    prefect_server.stop()
