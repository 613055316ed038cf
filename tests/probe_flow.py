"""A flow that only says which Prefect API it ran against (for tests/test_cli.py)."""

from prefect import flow


@flow(name="probe")
def probe(scale: str = "small", scheduler: str | None = None, results_dir: str = "results", store: str | None = None):
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    return {"api_url": PREFECT_API_URL.value(), "flow_run": str(FlowRunContext.get().flow_run.id)}
