"""What the deployed LMaaS service answers, asked over HTTP as its tenants would ask it."""

from __future__ import annotations

import asyncio

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


def served_accuracy(scaler, keys: dict[str, str], trained: list[dict], owners: dict[str, str], seed: int,
                    in_flight: int = 32) -> dict:
    """Each trained adapter's held-out accuracy, asked through the deployed service (and the base's):
    ``in_flight`` questions at a time, as many clients would ask them (the replica batches them;
    within a tenant's requests-in-flight quota)."""
    from tasks.lmaas.finetune import make_task

    asks = []  # (task, "adapter" | "base", model, tenant, example)
    for record in trained:
        job, tenant = make_task(record["task"], seed), owners[record["task"]]
        for which, model in (("adapter", f"{tenant}/{record['task']}"), ("base", "base")):
            asks += [(record["task"], which, model, tenant, e) for e in job.test]

    async def ask(http: httpx.AsyncClient, gate: asyncio.Semaphore, model: str, tenant: str, example) -> bool:
        async with gate:
            replica, _ = await asyncio.to_thread(scaler.acquire, model)
            try:
                r = await http.post(f"{replica.url}/v1/completions", headers={"Authorization": f"Bearer {keys[tenant]}"},
                                    json={"model": model, "prompt": example.prompt, "max_tokens": 4, "temperature": 0})
            finally:
                scaler.release(replica)
        r.raise_for_status()
        words = r.json()["choices"][0]["text"].strip().split()
        return bool(words) and words[0].strip(".,:;!") == example.answer

    async def ask_all() -> list[bool]:
        gate = asyncio.Semaphore(in_flight)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=in_flight)) as http:
            return await asyncio.gather(*(ask(http, gate, model, tenant, e) for _, _, model, tenant, e in asks))

    right = asyncio.run(ask_all())
    out: dict[str, dict[str, list[bool]]] = {}
    for (task_name, which, *_), ok in zip(asks, right):
        out.setdefault(task_name, {}).setdefault(which, []).append(ok)
    return {t: {which: sum(oks) / len(oks) for which, oks in scores.items()} for t, scores in out.items()}
