"""Scheduling policies on their own: which waiting request goes next, which running one gives way,
and an engine that takes its policy as a parameter."""

from __future__ import annotations

from tasks.lm.engine import LMEngine, Request
from tasks.lm.kvcache import SequenceKV
from tasks.lm.sampling import GREEDY, SamplingParams
from tasks.lm.scheduling import FifoPolicy, TenantFairShare


def request(tenant: str | None, arrived: float) -> Request:
    return Request(seq=SequenceKV(tokens=[1, 2]), params=GREEDY, owns_sequence=True, tenant=tenant, arrived=arrived)


def test_fifo_admits_the_earliest_and_preempts_the_latest_arrival():
    waiting = [request("a", 1.0), request("b", 2.0), request("a", 3.0)]
    assert FifoPolicy().next_request(waiting, running=[request("b", 0.5)]) is waiting[0]
    assert FifoPolicy().next_request([], running=[]) is None
    assert FifoPolicy().preemption_victim(waiting) is waiting[2]


def test_fair_share_admits_the_tenant_with_the_fewest_running_earliest_first():
    running = [request("a", 0.1), request("a", 0.2), request("b", 0.3)]
    waiting = [request("a", 1.0), request("a", 2.0), request("b", 3.0), request("c", 4.0), request("c", 5.0)]
    policy = TenantFairShare()
    assert policy.next_request(waiting, running) is waiting[3]  # c runs nothing: its earliest goes first
    assert policy.next_request(waiting[:3], running) is waiting[2]  # b runs one, a two
    assert policy.next_request(waiting[:2], running) is waiting[0]
    # requests without a tenant count as one tenant of their own
    anonymous = [request(None, 6.0), request(None, 7.0)]
    assert policy.next_request([*anonymous, request("d", 8.0)], [request(None, 0.0)]).tenant == "d"


class OnlyTenant(FifoPolicy):
    """A policy that gates admission: one tenant's requests only."""

    def __init__(self, tenant: str):
        self.tenant = tenant

    def next_request(self, waiting, running):
        return next((r for r in waiting if r.tenant == self.tenant), None)


def test_the_engine_admits_what_its_policy_picks_and_nothing_it_holds_back(engine):
    gated = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=16, policy=OnlyTenant("b"))
    params = SamplingParams(temperature=0, max_tokens=2)
    a, b = (gated.submit(gated.open("Hello"), params, owns_sequence=True, tenant=t) for t in "ab")
    gated.run([b])
    assert b.finish_reason == "length" and not a.finished and list(gated.waiting) == [a]
    gated.policy = FifoPolicy()
    gated.run([a])
    assert a.finish_reason == "length"
