"""Serving partitions: build them on a worker, search them with permission filters, merge results.

A :class:`PartitionServer` holds the partitions one worker serves, for any number of
strategies (keyed by name), and answers *search jobs* — "query q of a user with roles R,
on partition p, at effort e" — with real faiss searches timed one query at a time. Every
search carries the user's permission filter, even where the partition holds only what
the user may see: the filter is the security boundary, not the partitioning.
:func:`merge_results` combines a query's per-partition results, drops duplicates and
re-checks each document against the user's permissions before taking the top k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tasks.honeybee.index import IndexConfig, PartitionIndex, PermissionFilter, faiss_threads
from tasks.honeybee.rbac import Rbac


@dataclass(frozen=True)
class PartitionSpec:
    """A partition to build: the documents granted to any of ``roles``, indexed as ``kind``."""

    pid: int
    roles: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class SearchJob:
    """Search partition ``pid`` for query ``query`` of a user holding ``roles``: at ``effort``
    (efSearch of an HNSW graph walk, nprobe of an IVF search), or an exact scan of the user's
    permitted vectors."""

    query: int
    roles: frozenset[str]
    pid: int
    effort: int
    exact: bool = False


class PartitionServer:
    """The partitions of one worker, over the workload's vectors and permissions.

    Parameters
    ----------
    vectors: the corpus (N, d) float32.
    queries: the query vectors (Q, d) float32 that jobs refer to by row.
    rbac: the permissions every search is filtered by.
    """

    def __init__(self, vectors: np.ndarray, queries: np.ndarray, rbac: Rbac, *, hnsw_m: int = 32,
                 ef_construction: int = 40):
        self.vectors, self.queries, self.rbac = vectors, queries, rbac
        self.hnsw_m, self.ef_construction = hnsw_m, ef_construction
        self.partitions: dict[str, dict[int, PartitionIndex]] = {}
        self._filters: dict[tuple[str, int, frozenset[str]], PermissionFilter] = {}

    def build(self, strategy: str, specs: list[PartitionSpec], threads: int = 1) -> list[dict]:
        """Build ``specs`` for ``strategy``; returns per partition its size, bytes and build seconds."""
        built, report = self.partitions.setdefault(strategy, {}), []
        with faiss_threads(threads):
            for spec in specs:
                start = time.perf_counter()
                docs = np.flatnonzero(self.rbac.permitted_mask(frozenset(spec.roles))).astype(np.int64)
                config = IndexConfig(spec.kind, hnsw_m=self.hnsw_m, ef_construction=self.ef_construction)
                built[spec.pid] = PartitionIndex.build(self.vectors[docs], docs, config)
                report.append({"pid": spec.pid, "kind": spec.kind, "size": int(len(docs)),
                               "nbytes": int(built[spec.pid].nbytes), "build_s": time.perf_counter() - start})
        return report

    def permissions_changed(self, vectors: np.ndarray, rbac: Rbac) -> None:
        """New vectors or permissions: every cached filter is dropped and rebuilt from ``rbac`` on use."""
        self.vectors, self.rbac = vectors, rbac
        self._filters.clear()

    def drop(self, strategy: str) -> None:
        """Free a strategy's partitions and filters."""
        self.partitions.pop(strategy, None)
        self._filters = {key: f for key, f in self._filters.items() if key[0] != strategy}

    def filter_for(self, strategy: str, pid: int, roles: frozenset[str]) -> PermissionFilter:
        key = (strategy, pid, roles)
        if key not in self._filters:
            self._filters[key] = self.partitions[strategy][pid].permission_filter(self.rbac.permitted_mask(roles))
        return self._filters[key]

    def search(self, strategy: str, jobs: list[SearchJob], k: int, queries: np.ndarray | None = None,
               passes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run ``jobs`` one query at a time on one thread; a job's ``query`` is a row of ``queries``
        (default: the server's query vectors).

        Returns (D, I, seconds): (len(jobs), k) distances and global doc ids (padded with
        inf / -1) and each search's wall seconds — with ``passes`` > 1 the jobs are run that
        many times over, one pass after another, and each keeps its median (see
        :data:`~tasks.honeybee.index.TIMED_PASSES`). Building a user's filter the first time
        is done before the clock starts (a serving system caches it per role set).
        """
        D = np.full((len(jobs), k), np.inf, dtype=np.float32)
        I = np.full((len(jobs), k), -1, dtype=np.int64)
        seconds = np.zeros((passes, len(jobs)))
        partitions = self.partitions[strategy]
        queries = self.queries if queries is None else queries
        filters = [self.filter_for(strategy, job.pid, job.roles) for job in jobs]
        with faiss_threads(1):
            for p in range(passes):
                for j, (job, flt) in enumerate(zip(jobs, filters)):
                    index, query = partitions[job.pid], queries[job.query : job.query + 1]
                    start = time.perf_counter()
                    d, i = index.search(query, k, flt, ef=job.effort or None, nprobe=job.effort or None,
                                        exact=job.exact and index.kind == "hnsw")
                    seconds[p, j] = time.perf_counter() - start
                    D[j], I[j] = d[0], i[0]
        return D, I, np.median(seconds, axis=0)


def merge_results(distances: list[np.ndarray], ids: list[np.ndarray], permitted: np.ndarray,
                  k: int) -> tuple[np.ndarray, int]:
    """Top ``k`` doc ids of one query across its partitions' results.

    Duplicates (a document replicated in two searched partitions) count once; any
    document outside ``permitted`` (the user's (N,) mask) is dropped and counted.
    Returns (ids padded with -1, number of documents the final permission check dropped).
    """
    out = np.full(k, -1, dtype=np.int64)
    if len(ids) == 1:  # one partition (most queries): its answer is in distance order, each doc once
        keep = ids[0] >= 0
        d, i = distances[0][keep], ids[0][keep]
        allowed = permitted[i]
        rejected = len(i) - int(np.count_nonzero(allowed))
        if rejected:
            d, i = d[allowed], i[allowed]
        if len(d) > 1 and not (np.diff(d) > 0).all():  # a distance tie: the smaller id first, as below
            i = i[np.lexsort((i, d))]
        out[: min(k, len(i))] = i[:k]
        return out, rejected
    d = np.concatenate(distances) if distances else np.zeros(0, dtype=np.float32)
    i = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    keep = i >= 0
    d, i = d[keep], i[keep]
    allowed = permitted[i]
    rejected = int((~allowed).sum())
    d, i = d[allowed], i[allowed]
    order = np.lexsort((i, d))
    i = i[order]
    _, first = np.unique(i, return_index=True)
    top = i[np.sort(first)][:k]
    out[: len(top)] = top
    return out, rejected
