"""The embedded default: the paper's VQA workflow on a four-tier infrastructure (paths only, so
that the command line can name them without importing the optimizer)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
DEFAULT_WORKFLOW = DATA / "vqa.workflow.yaml"
DEFAULT_INFRA = DATA / "vqa.infra.yaml"
