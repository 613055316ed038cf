"""The LMaaS front door: the LM server made multi-tenant over the :class:`Registry`.

Every request carries an API key (``Authorization: Bearer tfk-…``) and a model: ``base`` or
``<tenant>/<adapter>``. :class:`LmaasTenancy` answers, in OpenAI's error shape:

- 401 for a missing or unknown key;
- 403 for another tenant's adapter — the same answer whether or not it exists;
- 404 for an adapter of one's own tenant that does not exist;
- 429 (with ``Retry-After``) when the tenant is over a quota: requests in flight, or tokens per
  minute. Only that tenant is turned away; the others keep being served.

The token quota counts what a request *may* use before it runs: its prompt plus every token it may
generate (``max_tokens`` for each choice, which the server bounds by the context) is reserved at
admission and counted with the tokens the tenant's finished requests used in the last minute;
when the request ends, the reservation gives way to what it really used. A request whose
reservation does not fit what is left of the quota is refused (429, and one that could never fit
says so), so a tenant's tokens in any minute stay within its quota. A request without a
``max_tokens`` reserves what the quota has room for and may generate that much.

Granted requests run on the shared engine (their adapter fetched from the artifact store into host
memory when the engine does not hold it), admitted fairly between tenants
(:class:`~tasks.lm.scheduling.TenantFairShare`). When each is over, its
tokens, time to first token, latency and cost are written to the registry: cost is the request's
share of the forward passes it took part in, priced at the serving worker's $/hour.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from fastapi import FastAPI

from tasks.lm.engine import LMEngine
from tasks.lm.scheduling import TenantFairShare
from tasks.lm.server import Grant, TenancyError, create_app
from tasks.lmaas.registry import BASE_MODEL, AccessDenied, AdapterInfo, Registry, RegistryError, TenantInfo, UnknownModel

QUOTA_WINDOW_S = 60.0
HOST_DEVICE = "cpu-small"  # the catalog's 2-vCPU CPU worker: this machine's kind


def default_price_per_hour(device: str = HOST_DEVICE) -> float:
    """$/hour of a serving worker of catalog ``device``, for metering."""
    from infra.catalog import load_catalog

    return load_catalog().device(device).usd_per_hour


def engine_adapter_name(adapter: AdapterInfo) -> str:
    """The name a registered adapter has in the engine: its model name and weights checksum."""
    return f"{adapter.model}@{adapter.sha256[:16]}"


class LmaasTenancy:
    """Keys, model names, quotas and metering for the LM server, from ``registry``."""

    def __init__(self, registry: Registry, engine: LMEngine, price_per_hour: float):
        self.registry, self.engine, self.price_per_hour = registry, engine, price_per_hour
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}  # tenant -> (finished at, tokens) this window
        self._reserved: dict[str, int] = {}  # tenant -> tokens its requests in flight may still use
        self._limit: dict[str, int] = {}  # tenant -> tokens per minute, as read when it was last admitted

    async def _tenant(self, authorization: str | None) -> TenantInfo:
        key = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
        tenant = await asyncio.to_thread(self.registry.authenticate, key)
        if tenant is None:
            raise TenancyError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")
        return tenant

    async def models(self, authorization: str | None) -> list[str]:
        tenant = await self._tenant(authorization)
        adapters = await asyncio.to_thread(self.registry.adapters, tenant.name)
        return [BASE_MODEL, *(a.model for a in adapters)]

    async def usage(self, authorization: str | None) -> dict:
        tenant = await self._tenant(authorization)
        return await asyncio.to_thread(self.registry.usage, tenant)

    async def admit(self, authorization: str | None, model: str) -> Grant:
        tenant = await self._tenant(authorization)
        try:
            adapter = await asyncio.to_thread(self.registry.resolve, tenant, model)
        except AccessDenied as exc:
            raise TenancyError(403, str(exc), type="permission_error", param="model", code="model_not_allowed") from None
        except UnknownModel as exc:
            raise TenancyError(404, str(exc), param="model", code="model_not_found") from None
        self._take_quota(tenant)
        grant = Grant(tenant=tenant.name, model=model, release=lambda: self._release(tenant.name))
        if adapter is not None:
            # named by its weights' checksum in the engine: an adapter removed and registered again
            # under the same name never meets prefixes cached with the old weights
            grant.adapter = engine_adapter_name(adapter)
            try:
                # held by the grant: should the engine evict it from host memory before this request
                # reaches it, the request brings it back without a second fetch
                grant.adapter_weights = self.engine.adapters.get(grant.adapter)
                if grant.adapter_weights is None:  # a cold adapter: from the artifact store
                    grant.adapter_weights = await asyncio.to_thread(self.registry.fetch_adapter, adapter)
            except BaseException:
                grant.release()
                raise
        return grant

    def _window(self, tenant: str, now: float) -> deque[tuple[float, int]]:
        """The tenant's finished requests of the last minute (the caller holds the lock)."""
        window = self._tokens.setdefault(tenant, deque())
        while window and window[0][0] < now - QUOTA_WINDOW_S:
            window.popleft()
        return window

    def _take_quota(self, tenant: TenantInfo) -> None:
        """Admission before the prompt is read: a place among the tenant's requests in flight, and
        some of its token quota left."""
        now = time.monotonic()
        with self._lock:
            in_flight = self._in_flight.get(tenant.name, 0)
            if in_flight >= tenant.max_concurrent:
                raise TenancyError(429, f"tenant {tenant.name!r} has {in_flight} requests in flight, its limit; "
                                   "retry when one finishes", type="rate_limit_error", code="rate_limit_exceeded",
                                   headers={"Retry-After": "1"})
            window = self._window(tenant.name, now)
            used, reserved = sum(tokens for _, tokens in window), self._reserved.get(tenant.name, 0)
            if used + reserved >= tenant.tokens_per_minute:
                retry = self._retry_after(window, used + reserved - tenant.tokens_per_minute + 1, now)
                raise TenancyError(429, f"tenant {tenant.name!r} used {used} tokens in the last minute and holds "
                                   f"{reserved} for requests in flight; its limit is {tenant.tokens_per_minute} per "
                                   f"minute: retry in {retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                                   headers={"Retry-After": str(retry)})
            self._in_flight[tenant.name] = in_flight + 1
            self._limit[tenant.name] = tenant.tokens_per_minute

    @staticmethod
    def _retry_after(window: deque[tuple[float, int]], excess: int, now: float) -> int:
        """Seconds until finished requests leaving the window free ``excess`` tokens (1 when the
        window cannot: requests in flight must end first)."""
        freed = 0
        for finished_at, tokens in window:
            freed += tokens
            if freed >= excess:
                return max(1, int(finished_at + QUOTA_WINDOW_S - now) + 1)
        return 1

    def reserve(self, grant: Grant, prompt_tokens: int, completion_tokens: int, at_least: int) -> int:
        """Hold the prompt and up to ``completion_tokens`` (at least ``at_least``) against the
        tenant's tokens per minute; the held amount is released by :meth:`finished`."""
        tenant, limit = grant.tenant, self._limit[grant.tenant]
        needed = prompt_tokens + at_least
        if needed > limit:
            raise TenancyError(429, f"the request may use {needed} tokens ({prompt_tokens} in the prompt, "
                               f"{at_least} to generate), more than tenant {tenant!r}'s quota of {limit} tokens "
                               "per minute: shorten the prompt or lower max_tokens", type="rate_limit_error",
                               code="rate_limit_exceeded")
        now = time.monotonic()
        with self._lock:
            window = self._window(tenant, now)
            used, reserved = sum(tokens for _, tokens in window), self._reserved.get(tenant, 0)
            room = limit - used - reserved
            if needed > room:
                retry = self._retry_after(window, needed - room, now)
                raise TenancyError(429, f"the request may use {needed} tokens; tenant {tenant!r} used {used} tokens in "
                                   f"the last minute and holds {reserved} for requests in flight, of {limit} per "
                                   f"minute: retry in {retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                                   headers={"Retry-After": str(retry)})
            held = min(completion_tokens, room - prompt_tokens)
            grant.reserved_tokens = prompt_tokens + held
            self._reserved[tenant] = reserved + grant.reserved_tokens
        return held

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1

    def finished(self, grant: Grant, prompt_tokens: int, completion_tokens: int, ttft_s: float, latency_s: float,
                 compute_s: float) -> None:
        with self._lock:
            # the reservation gives way to what the request used
            self._reserved[grant.tenant] = self._reserved.get(grant.tenant, 0) - grant.reserved_tokens
            grant.reserved_tokens = 0
            if prompt_tokens + completion_tokens:
                self._tokens.setdefault(grant.tenant, deque()).append((time.monotonic(), prompt_tokens + completion_tokens))
        try:
            tenant = self.registry.tenant(grant.tenant)
        except RegistryError:
            return  # the tenant was removed while its request ran: nobody to bill
        self.registry.record_usage(tenant, grant.model, prompt_tokens, completion_tokens, ttft_s, latency_s,
                                   compute_s * self.price_per_hour / 3600)


def create_service_app(registry: Registry, engine: LMEngine, *, price_per_hour: float, max_queue: int = 256) -> FastAPI:
    """The multi-tenant OpenAI-compatible app: the LM server with an :class:`LmaasTenancy`. The
    engine is given the tenant fair-share policy: every tenant's requests share its batch."""
    engine.policy = TenantFairShare()
    tenancy = LmaasTenancy(registry, engine, price_per_hour)
    app = create_app(engine, max_queue=max_queue, tenancy=tenancy, title="tierflow LMaaS")
    app.state.tenancy = tenancy
    return app
