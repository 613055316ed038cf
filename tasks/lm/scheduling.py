"""Scheduling policies: which waiting request the engine admits next, and which running request
gives its KV blocks back when the cache is full.

The engine asks its policy at every admission; resources (a free LoRA slot, free cache blocks, a
shared prefix still being computed) are the engine's to check, so a policy only orders and gates.

- :class:`FifoPolicy` (the default): first come, first served; the latest arrival is preempted.
- :class:`TenantFairShare` (LMaaS): between tenants, the one with the fewest running requests goes
  first, so a tenant sending many cannot starve the rest; within a tenant, first come first served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.lm.engine import Request


class FifoPolicy:
    """First come, first served; under memory pressure the latest arrival gives way."""

    def next_request(self, waiting: Sequence[Request], running: Sequence[Request]) -> Request | None:
        """The waiting request to admit next (``waiting`` is in arrival order), or None to admit
        nothing more this step."""
        return waiting[0] if waiting else None

    def preemption_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request (of a non-empty ``candidates``) whose KV blocks are freed; it
        recomputes when re-admitted."""
        return max(candidates, key=lambda r: r.arrived)


class TenantFairShare(FifoPolicy):
    """Between tenants, the one with the fewest running requests goes first (ties: the earliest
    arrival); requests without a tenant count as one tenant of their own."""

    def next_request(self, waiting: Sequence[Request], running: Sequence[Request]) -> Request | None:
        if not waiting:
            return None
        counts: dict[str | None, int] = {}
        for r in running:
            counts[r.tenant] = counts.get(r.tenant, 0) + 1
        return min(waiting, key=lambda r: counts.get(r.tenant, 0))  # min keeps the earliest of ties
