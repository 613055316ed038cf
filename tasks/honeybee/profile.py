"""Measure filtered search on a worker: the grid the cost and recall models are fitted to.

For partitions of several sizes (random samples of the workload's documents) and
permission filters of several selectivities (random subsets of the partition), time
single-query faiss searches — HNSW at a ladder of efSearch values, IVF at a ladder of
nprobe values, and the exact scan —
and measure recall@k against exact filtered search. One thread, as a serving core runs; each
query's time is its median over :data:`~tasks.honeybee.index.TIMED_PASSES` passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from optimizers.honeybee_cost import MEASUREMENT_COLUMNS, ivf_cells
from tasks.honeybee.index import TIMED_PASSES, IndexConfig, PartitionIndex, exact_search, faiss_threads, recall_at_k


@dataclass(frozen=True)
class ProfileGrid:
    """What to measure. Sizes above the corpus are dropped; (n, s) pairs with fewer than
    ``2·k`` permitted documents are skipped (too few to measure recall@k)."""

    sizes: tuple[int, ...] = (1_000, 4_000, 16_000, 64_000)
    selectivities: tuple[float, ...] = (1.0, 0.5, 0.3, 0.1, 0.03, 0.01, 0.003)
    efs: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    nprobes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    n_queries: int = 40
    k: int = 10
    hnsw_m: int = 32
    ef_construction: int = 40


GRIDS = {
    "tiny": ProfileGrid(sizes=(300, 1_000, 2_500), selectivities=(1.0, 0.3, 0.1, 0.03), efs=(16, 32, 64, 128, 256, 512),
                        n_queries=20),
    "small": ProfileGrid(sizes=(1_000, 4_000, 16_000), efs=(16, 32, 64, 128, 256, 512, 1024, 2048), n_queries=30),
    "medium": ProfileGrid(),
    "large": ProfileGrid(sizes=(1_000, 4_000, 16_000, 64_000, 256_000)),
}


def grid_for(n_docs: int) -> str:
    """The grid that fits a corpus of ``n_docs`` documents (its sizes span the partitions it will have)."""
    return "tiny" if n_docs < 5_000 else "small" if n_docs < 50_000 else "medium" if n_docs < 500_000 else "large"


def _timed_search(index: PartitionIndex, queries: np.ndarray, k: int, flt, effort: int | None) -> tuple[np.ndarray, float]:
    """Each query's answer, and the mean over queries of each one's median seconds over :data:`TIMED_PASSES` passes."""
    found = np.empty((len(queries), k), dtype=np.int64)
    seconds = np.empty((TIMED_PASSES, len(queries)))
    for p in range(TIMED_PASSES):
        for i in range(len(queries)):
            start = time.perf_counter()
            found[i] = index.search(queries[i : i + 1], k, flt, ef=effort, nprobe=effort)[1][0]
            seconds[p, i] = time.perf_counter() - start
    return found, float(np.median(seconds, axis=0).mean())


def measure_search(vectors: np.ndarray, queries: np.ndarray, grid: ProfileGrid, *, seed: int = 0,
                   progress=None) -> pd.DataFrame:
    """Measure the grid on this machine; one row per (kind, n, selectivity, effort).

    Parameters
    ----------
    vectors: the corpus (N, d) float32; partitions are random samples of it.
    queries: query vectors (Q, d); ``grid.n_queries`` of them are used per cell.
    grid: sizes, selectivities and efforts to measure.
    progress: optional callable(str) told about each partition size as it starts.
    """
    rng = np.random.default_rng(seed)
    n_docs = len(vectors)
    q = queries[rng.choice(len(queries), size=min(grid.n_queries, len(queries)), replace=False)]
    rows = []
    with faiss_threads(1):
        for n in [n for n in grid.sizes if n <= n_docs]:
            if progress:
                progress(f"partition of {n} documents")
            doc_ids = np.sort(rng.choice(n_docs, size=n, replace=False)).astype(np.int64)
            hnsw = PartitionIndex.build(vectors[doc_ids], doc_ids,
                                        IndexConfig("hnsw", hnsw_m=grid.hnsw_m, ef_construction=grid.ef_construction))
            flat = PartitionIndex.build(vectors[doc_ids], doc_ids, IndexConfig("flat"))
            ivf = PartitionIndex.build(vectors[doc_ids], doc_ids, IndexConfig("ivf"))
            nlist = ivf_cells(n)
            for s in grid.selectivities:
                permitted = int(round(n * s))
                if permitted < 2 * grid.k:
                    continue
                allowed = np.zeros(n_docs, dtype=bool)
                allowed[rng.choice(doc_ids, size=permitted, replace=False)] = True
                _, truth = exact_search(vectors, q, grid.k, allowed)
                flt_flat = flat.permission_filter(allowed)
                found, seconds = _timed_search(flat, q, grid.k, flt_flat, None)
                rows.append(("flat", n, s, 0, grid.k, recall_at_k(found, truth), seconds))
                flt = hnsw.permission_filter(allowed)
                for ef in grid.efs:
                    found, seconds = _timed_search(hnsw, q, grid.k, flt, ef)
                    rows.append(("hnsw", n, s, ef, grid.k, recall_at_k(found, truth), seconds))
                flt = ivf.permission_filter(allowed)
                for nprobe in sorted({min(p, nlist) for p in grid.nprobes}):
                    found, seconds = _timed_search(ivf, q, grid.k, flt, nprobe)
                    rows.append(("ivf", n, s, nprobe, grid.k, recall_at_k(found, truth), seconds))
    return pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)
