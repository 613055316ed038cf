"""One HoneyBee partition's vector index: a real faiss index searched under a user's permission.

A partition holds a subset of the corpus. Its faiss index numbers vectors 0..n-1 in the
order they were added (the *local* ids); ``PartitionIndex.doc_ids`` maps them back to the
corpus' *global* doc ids, and everything public speaks global ids. A user's permission is
a bool mask over global ids; ``permission_filter`` turns it, once, into what faiss needs
for that partition (a bitmap ``IDSelector`` for HNSW and IVF, the admitted local ids for
flat), so a timed query pays no Python set-up. Deleted docs are tombstones (HNSW cannot
delete) folded into every filter.

``exact_search`` is the ground truth over the whole corpus, and ``recall_at_k`` scores an
index against it. The ANN algorithms are faiss' own: ``IndexHNSWFlat``, ``IndexIVFFlat``
and ``IndexFlatL2``.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, get_args

import faiss
import numpy as np

from optimizers.honeybee_cost import ivf_cells

IndexKind = Literal["hnsw", "ivf", "flat"]

DEFAULT_EF = 64  # HNSW efSearch when the caller names none
DEFAULT_NPROBE = 8  # IVF lists probed when the caller names none
KMEANS_SEED = 1234  # IVF training is deterministic for a given partition
EXACT_CHUNK_ROWS = 1 << 18  # corpus rows gathered at a time by exact_search (≤ 128 MiB at d = 128)
# Timed searches (profile and evaluation) run this many passes over their queries and keep each
# query's median: a core shared with other processes now and then loses a whole time slice
# (~4 ms, 20–40× a search here) to them, which would otherwise land on whichever search ran then.
TIMED_PASSES = 3


@dataclass(frozen=True)
class IndexConfig:
    """How a partition is indexed.

    Parameters
    ----------
    kind: ``"hnsw"`` (graph), ``"ivf"`` (inverted lists over k-means cells) or ``"flat"`` (exact scan).
    hnsw_m: HNSW neighbours per node (faiss ``M``).
    ef_construction: HNSW candidate list size while building.
    ivf_nlist: IVF cells; ``None`` → about 4·sqrt(n), at least 1, at most n // 39.
    """

    kind: IndexKind = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 40
    ivf_nlist: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(IndexKind):
            raise ValueError(f"kind must be one of {get_args(IndexKind)}, got {self.kind!r}")
        if self.hnsw_m < 2:
            raise ValueError(f"hnsw_m must be ≥ 2, got {self.hnsw_m}")
        if self.ef_construction < 1:
            raise ValueError(f"ef_construction must be ≥ 1, got {self.ef_construction}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError(f"ivf_nlist must be ≥ 1 or None, got {self.ivf_nlist}")


def ivf_nlist_for(n: int, requested: int | None = None) -> int:
    """IVF cells for a partition of ``n`` vectors: ``requested``, else ≈ 4·sqrt(n) in [1, n // 39]."""
    if requested is not None:
        if requested > n:
            raise ValueError(f"ivf_nlist={requested} exceeds the partition's {n} vectors (k-means needs one per cell)")
        return requested
    return ivf_cells(n)  # the cost model prices IVF with the same number of cells


class PermissionFilter:
    """A user's permission as a faiss selector over one partition's local ids (keeps its bitmap alive).

    Made by ``PartitionIndex.permission_filter``. It is a snapshot of the permission for the
    docs the partition held when it was made: docs added later are not admitted (make a new
    filter), docs removed later are never returned (the filter re-folds tombstones on its
    next use).
    """

    def __init__(self, owner: PartitionIndex, permitted: np.ndarray):
        self._owner = owner
        self._permitted = permitted  # local ids' permission, before tombstones
        self._version = -1
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the selector from the permission and the owner's current tombstones."""
        owner = self._owner
        admitted = self._permitted & owner._live[: len(self._permitted)]
        self.admitted = int(admitted.sum())
        # Everything live admitted and nothing deleted: search the bare index, no selector.
        self._everything = self.admitted == len(owner._live)
        self._admitted_mask = admitted
        self._local_ids = np.flatnonzero(admitted).astype(np.int64) if owner.kind == "flat" else None
        self._bits = self._selector = None
        if owner.kind != "flat" and not self._everything:
            self._bits = np.packbits(admitted, bitorder="little")
            self._selector = faiss.IDSelectorBitmap(len(admitted), faiss.swig_ptr(self._bits))
        self._params: dict[int, faiss.SearchParameters] = {}
        self._version = owner._version

    @property
    def local_ids(self) -> np.ndarray:
        """Local ids of the admitted live docs (made on first use for graph indexes)."""
        if self._local_ids is None:
            self._local_ids = np.flatnonzero(self._admitted_mask).astype(np.int64)
        return self._local_ids

    def _search_params(self, knob: int) -> faiss.SearchParameters:
        """Cached faiss search parameters for this selector and ``knob`` (efSearch or nprobe)."""
        params = self._params.get(knob)
        if params is None:
            if self._owner.kind == "hnsw":
                params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=knob)
            else:
                params = faiss.SearchParametersIVF(sel=self._selector, nprobe=knob)
            self._params[knob] = params
        return params

    @property
    def nbytes(self) -> int:
        """Memory this filter holds besides the index (bitmap or admitted ids, and the permission)."""
        held = (self._bits, self._local_ids, self._permitted)
        return sum(a.nbytes for a in held if a is not None)


class PartitionIndex:
    """One partition's faiss index over a subset of the corpus, addressed by global doc ids."""

    kind: IndexKind
    doc_ids: np.ndarray  # int64 global ids, position = faiss local id (append-only)

    def __init__(self, index: faiss.Index, kind: IndexKind, doc_ids: np.ndarray, live: np.ndarray):
        """Wrap an already filled faiss ``index``; use ``build`` or ``from_bytes`` instead."""
        self._index = index
        self.kind = kind
        self.doc_ids = doc_ids
        self.doc_ids.flags.writeable = False
        self._live = live
        self._version = 0
        self._everyone = PermissionFilter(self, np.ones(len(live), dtype=bool))

    @classmethod
    def build(cls, vectors: np.ndarray, doc_ids: np.ndarray, config: IndexConfig = IndexConfig()) -> PartitionIndex:
        """Index ``vectors`` ((n, d) rows for exactly these global ``doc_ids``) as ``config`` says.

        Rows are stored in ascending doc-id order, so the exact kinds break distance ties
        by the smaller id, as ``exact_search`` does.
        """
        vectors, doc_ids = _check_rows(vectors, doc_ids, d=None)
        order = np.argsort(doc_ids, kind="stable")
        vectors, doc_ids = np.ascontiguousarray(vectors[order]), doc_ids[order]
        n, d = vectors.shape
        if config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m)
            index.hnsw.efConstruction = config.ef_construction
        elif config.kind == "ivf":
            if n == 0:
                raise ValueError("an ivf partition needs at least one vector to train its cells")
            nlist = ivf_nlist_for(n, config.ivf_nlist)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.cp.seed = KMEANS_SEED
            if nlist == 1:  # one cell is just the mean: nothing to warn about however few points
                index.cp.min_points_per_centroid = 1
            index.train(vectors)
        else:
            index = faiss.IndexFlatL2(d)
        index.add(vectors)
        return cls(index, config.kind, doc_ids, np.ones(n, dtype=bool))

    @property
    def d(self) -> int:
        """Vector dimension."""
        return self._index.d

    @property
    def size(self) -> int:
        """Live (not deleted) vectors."""
        return self._everyone.admitted

    @property
    def nbytes(self) -> int:
        """Approximate memory of the index including its vectors, id map and tombstones."""
        n, d = self._index.ntotal, self.d
        if self.kind == "hnsw":
            graph = self._index.hnsw
            extra = graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4
        elif self.kind == "ivf":
            extra = n * 8 + self._index.nlist * d * 4  # stored ids + centroids
        else:
            extra = 0
        return n * d * 4 + extra + self.doc_ids.nbytes + self._live.nbytes

    def permission_filter(self, allowed: np.ndarray) -> PermissionFilter:
        """The filter admitting the live docs of this partition that ``allowed`` permits.

        Parameters
        ----------
        allowed: (N_global,) bool mask over global doc ids, N_global > every id in this partition.
        """
        allowed = np.asarray(allowed)
        if allowed.ndim != 1 or allowed.dtype != bool:
            raise ValueError(f"allowed must be a 1-D bool mask over global doc ids, got {allowed.dtype} of shape {allowed.shape}")
        if len(self.doc_ids) and len(allowed) <= self.doc_ids.max():
            raise ValueError(f"allowed has length {len(allowed)} but the partition holds doc id {self.doc_ids.max()}")
        return PermissionFilter(self, allowed[self.doc_ids])

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filter: PermissionFilter | None = None,
        *,
        ef: int | None = None,
        nprobe: int | None = None,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest live docs to each query that ``filter`` admits.

        Parameters
        ----------
        queries: (q, d) float32 rows (or one (d,) row).
        k: results per query.
        filter: from ``permission_filter``; ``None`` admits every live doc.
        ef: HNSW efSearch (default 64, raised to at least ``k``).
        nprobe: IVF lists probed (default 8, clamped to [1, nlist]).
        exact: scan the admitted vectors exactly instead of walking the graph (hnsw; a flat
            partition is always exact). For a user who may see little of a big partition
            this is far cheaper than the effort a graph search needs, at the same storage.

        Returns
        -------
        (D, I): (q, k) float32 squared-L2 distances, ascending, and int64 global doc ids,
        padded with (inf, -1) where fewer than ``k`` docs are found.
        """
        queries = _check_queries(queries, self.d)
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        admits = self._everyone if filter is None else filter
        if admits._owner is not self:
            raise ValueError("filter was made by another PartitionIndex")
        if admits._version != self._version:
            admits._refresh()
        if admits.admitted == 0:
            return _padding(len(queries), k)
        if exact and self.kind == "ivf":
            raise ValueError("exact scans read the vectors in place: only flat and hnsw partitions have them in one array")
        if self.kind == "flat" and admits._everything:
            D, I = self._index.search(queries, k)
        elif self.kind == "flat" or exact:
            D, I = self._flat_subset_search(queries, k, admits.local_ids)
        else:
            D, I = self._index.search(queries, k, params=admits._search_params(self._knob(k, ef, nprobe)))
        found = I >= 0
        D[~found] = np.inf
        return D, np.where(found, self.doc_ids[I], -1)

    def _knob(self, k: int, ef: int | None, nprobe: int | None) -> int:
        """efSearch (HNSW, at least k) or nprobe (IVF, within [1, nlist])."""
        if self.kind == "hnsw":
            return max(k, DEFAULT_EF if ef is None else ef)
        return min(max(1, DEFAULT_NPROBE if nprobe is None else nprobe), self._index.nlist)

    def _flat_subset_search(self, queries: np.ndarray, k: int, local_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over only the admitted rows, read in place (no gather, no bitmap scan)."""
        nq = len(queries)
        D = np.empty((nq, k), dtype=np.float32)
        I = np.empty((nq, k), dtype=np.int64)
        faiss.knn_L2sqr_by_idx(
            faiss.swig_ptr(queries), self._vectors(), faiss.swig_ptr(local_ids),
            self.d, nq, self._index.ntotal, len(local_ids), k, faiss.swig_ptr(D), faiss.swig_ptr(I),
            0,  # every query scans the same subset
        )
        return D, I

    def _vectors(self):
        """Pointer to the stored vectors (row = local id): the flat index's, or the HNSW graph's storage."""
        if self.kind == "hnsw":
            return faiss.downcast_index(self._index.storage).get_xb()
        return self._index.get_xb()

    def add(self, vectors: np.ndarray, doc_ids: np.ndarray) -> None:
        """Add new docs (ids not live in this partition). IVF assigns them to its trained cells."""
        vectors, doc_ids = _check_rows(vectors, doc_ids, d=self.d)
        clash = doc_ids[np.isin(doc_ids, self.doc_ids[self._live])]
        if len(clash):
            raise ValueError(f"doc id {clash[0]} is already live in this partition")
        self._index.add(vectors)
        self.doc_ids = np.concatenate([self.doc_ids, doc_ids])
        self.doc_ids.flags.writeable = False
        self._live = np.concatenate([self._live, np.ones(len(doc_ids), dtype=bool)])
        self._changed()

    def remove(self, doc_ids: np.ndarray) -> int:
        """Tombstone these global ids (unknown or already removed ids are ignored); returns how many were live."""
        hit = np.isin(self.doc_ids, np.asarray(doc_ids, dtype=np.int64).ravel()) & self._live
        removed = int(hit.sum())
        if removed:
            self._live[hit] = False
            self._changed()
        return removed

    def _changed(self) -> None:
        """Docs were added or removed: every filter re-folds tombstones on its next use."""
        self._version += 1
        self._everyone = PermissionFilter(self, np.ones(len(self._live), dtype=bool))

    def to_bytes(self) -> bytes:
        """The faiss index (``faiss.serialize_index``), id map and tombstones, as one npz."""
        buffer = io.BytesIO()
        np.savez(buffer, index=faiss.serialize_index(self._index), kind=np.array(self.kind), doc_ids=self.doc_ids, live=self._live)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PartitionIndex:
        """The partition ``to_bytes`` wrote; it searches identically."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(faiss.deserialize_index(npz["index"]), str(npz["kind"]), npz["doc_ids"].copy(), npz["live"].copy())


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: the ``k`` nearest allowed docs of the whole corpus, by squared L2.

    Parameters
    ----------
    vectors: (N, d) float32 corpus; row i is global doc id i.
    queries: (q, d) float32 rows (or one (d,) row).
    k: results per query.
    allowed: (N,) bool mask, the same for every query; ``None`` allows all.

    Returns
    -------
    (D, I) as ``PartitionIndex.search``: ascending, ties by the smaller id, padded (inf, -1).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = _check_queries(queries, vectors.shape[1])
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if allowed is None:
        D, I = faiss.knn(queries, vectors, k)
    else:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (len(vectors),):
            raise ValueError(f"allowed must have shape ({len(vectors)},), got {allowed.shape}")
        D, I = _padding(len(queries), k)
        # Gather the allowed rows a chunk at a time to bound the copy, merging top-k lists.
        for start in range(0, len(vectors), EXACT_CHUNK_ROWS):
            chunk = allowed[start : start + EXACT_CHUNK_ROWS]
            rows = np.flatnonzero(chunk)
            if len(rows) == 0:
                continue
            block = vectors[start : start + len(chunk)] if len(rows) == len(chunk) else vectors[start + rows]
            Dc, Ic = faiss.knn(queries, block, min(k, len(rows)))
            D, I = _merge_top_k(D, I, Dc, start + rows[Ic], k)
    found = I >= 0
    D[~found] = np.inf
    I[~found] = -1
    return _sort_ties_by_id(D, I)


def _merge_top_k(D1: np.ndarray, I1: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two result lists per row, by (distance, id) with padding last."""
    D, I = np.hstack([D1, D2]), np.hstack([I1, I2])
    order = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), D), axis=-1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def _sort_ties_by_id(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _merge_top_k(D, I, D[:, :0], I[:, :0], D.shape[1])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i|, ignoring -1 padding.

    A query with no true results scores 1 if nothing was found either, else 0.
    """
    found, truth = np.atleast_2d(found), np.atleast_2d(truth)
    if len(found) != len(truth):
        raise ValueError(f"found has {len(found)} queries but truth has {len(truth)}")
    if len(truth) == 0:
        raise ValueError("recall of zero queries is undefined")
    scores = []
    for f, t in zip(found, truth):
        f, t = set(f[f >= 0].tolist()), set(t[t >= 0].tolist())
        scores.append(len(f & t) / len(t) if t else float(not f))
    return float(np.mean(scores))


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads inside the block, restoring the previous count after."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _check_rows(vectors: np.ndarray, doc_ids: np.ndarray, d: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 rows and n distinct non-negative int64 ids, or a ValueError naming the argument."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    doc_ids = np.asarray(doc_ids)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"vectors must be (n, d) with d ≥ 1, got shape {vectors.shape}")
    if d is not None and vectors.shape[1] != d:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, the partition {d}")
    if doc_ids.ndim != 1 or (len(doc_ids) and not np.issubdtype(doc_ids.dtype, np.integer)):
        raise ValueError(f"doc_ids must be a 1-D integer array, got {doc_ids.dtype} of shape {doc_ids.shape}")
    doc_ids = doc_ids.astype(np.int64)
    if len(doc_ids) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(doc_ids)} doc_ids")
    if len(doc_ids) and doc_ids.min() < 0:
        raise ValueError(f"doc_ids must be ≥ 0, got {doc_ids.min()}")
    unique, counts = np.unique(doc_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"doc id {unique[counts > 1][0]} appears more than once in doc_ids")
    return vectors, doc_ids


def _check_queries(queries: np.ndarray, d: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != d:
        raise ValueError(f"queries must be (q, {d}), got shape {queries.shape}")
    return queries


def _padding(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
