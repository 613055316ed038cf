"""What the deployed LMaaS service answers, asked over HTTP as its tenants would ask it."""

from __future__ import annotations

import httpx


def probe_isolation(url: str, keys: dict[str, str], models: list[str]) -> dict[str, int]:
    """The HTTP status the service answers a tenant with for: its own adapter, another tenant's, an
    unknown one of its own, and a wrong key (each a one-token completion)."""
    tenants = sorted({m.split("/")[0] for m in models})
    mine = next(m for m in models if m.startswith(tenants[0] + "/"))
    other = next(m for m in models if not m.startswith(tenants[0] + "/"))
    cases = {"own adapter": (keys[tenants[0]], mine), "another tenant's adapter": (keys[tenants[0]], other),
             "unknown adapter of one's own": (keys[tenants[0]], f"{tenants[0]}/no-such-adapter"),
             "wrong API key": ("tfk-not-a-key", mine)}
    answers = {}
    for case, (key, model) in cases.items():
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        answers[case] = r.status_code
    return answers


def served_accuracy(scaler, keys: dict[str, str], trained: list[dict], owners: dict[str, str], seed: int) -> dict:
    """Each trained adapter's held-out accuracy, asked through the deployed service (and the base's)."""
    from tasks.lmaas.finetune import make_task

    out = {}
    for record in trained:
        job, tenant = make_task(record["task"], seed), owners[record["task"]]
        scores = {}
        for model in (f"{tenant}/{record['task']}", "base"):
            replica, _ = scaler.acquire(model)
            try:
                right = 0
                for e in job.test:
                    r = httpx.post(f"{replica.url}/v1/completions", timeout=120,
                                   json={"model": model, "prompt": e.prompt, "max_tokens": 4, "temperature": 0},
                                   headers={"Authorization": f"Bearer {keys[tenant]}"})
                    r.raise_for_status()
                    words = r.json()["choices"][0]["text"].strip().split()
                    right += bool(words) and words[0].strip(".,:;!") == e.answer
                scores["adapter" if model != "base" else "base"] = right / len(job.test)
            finally:
                scaler.release(replica)
        out[record["task"]] = scores
    return out
