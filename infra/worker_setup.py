"""Dask worker preload (``infra.cluster`` names it for every embedded worker): Prefect's global
settings are read again from this worker's own environment. A worker forked from the fork server
inherited the settings Prefect read there when it was imported, before the Nanny set the
worker's environment (``PREFECT_API_URL``, ``PREFECT_HOME``)."""

from __future__ import annotations


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload signature
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
