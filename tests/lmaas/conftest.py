"""LMaaS fixtures: one throwaway PostgreSQL server for the tests that use one."""

import pytest

from tests.lmaas.postgres import postgres_server


@pytest.fixture(scope="session")
def postgres():
    """The URL (``postgresql://postgres@127.0.0.1:PORT``) of a real PostgreSQL server, stopped at the end."""
    with postgres_server() as url:
        yield url
