"""HoneyBee's partition index: filtered faiss search returns only permitted, live docs, and is as exact as promised."""

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.honeybee.index import (
    IndexConfig,
    PartitionIndex,
    exact_search,
    faiss_threads,
    ivf_nlist_for,
    recall_at_k,
)

KINDS = ["hnsw", "ivf", "flat"]


def clustered(n: int, d: int, seed: int, clusters: int = 20) -> np.ndarray:
    """Gaussian blobs around random centres, the shape of real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def corpus_and_queries(n: int, q: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clustered docs and ``q`` held-out queries drawn from the same blobs."""
    data = clustered(n + q, d, seed)
    return data[:n], data[n:]


def exhaustive(index: PartitionIndex) -> dict:
    """Search knobs that make an index kind scan everything (IVF: every list)."""
    return {"nprobe": index._index.nlist} if index.kind == "ivf" else {}


def brute_force(vectors, queries, k, allowed):
    """Top-k allowed ids by squared L2 in numpy, ties by the smaller id, padded (inf, -1)."""
    dist = ((queries[:, None, :].astype(np.float64) - vectors[None, :, :]) ** 2).sum(-1)
    ids = np.flatnonzero(allowed)
    D, I = np.full((len(queries), k), np.inf), np.full((len(queries), k), -1)
    for q in range(len(queries)):
        order = np.lexsort((ids, dist[q, ids]))[:k]
        D[q, : len(order)], I[q, : len(order)] = dist[q, ids[order]], ids[order]
    return D, I


@st.composite
def partitions(draw):
    """A small corpus, one partition of it, a user's permission mask and docs deleted later."""
    n_global = draw(st.integers(1, 60))
    members = draw(st.lists(st.booleans(), min_size=n_global, max_size=n_global))
    if not any(members):
        members[draw(st.integers(0, n_global - 1))] = True
    allowed = draw(st.lists(st.booleans(), min_size=n_global, max_size=n_global))
    doc_ids = np.flatnonzero(members)
    removed = draw(st.lists(st.sampled_from(doc_ids.tolist()), max_size=len(doc_ids), unique=True))
    return {
        "n_global": n_global,
        "doc_ids": doc_ids,
        "allowed": np.array(allowed),
        "removed": np.array(removed, dtype=np.int64),
        "kind": draw(st.sampled_from(KINDS)),
        "k": draw(st.integers(1, 12)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=partitions())
def test_filtered_search_returns_only_permitted_live_docs_and_exact_kinds_return_all_of_them(case):
    rng = np.random.default_rng(case["seed"])
    vectors = rng.normal(size=(case["n_global"], 4)).astype(np.float32)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    doc_ids, allowed, removed, k = case["doc_ids"], case["allowed"], case["removed"], case["k"]
    index = PartitionIndex.build(vectors[doc_ids], doc_ids, IndexConfig(kind=case["kind"], hnsw_m=4))
    made_before_removal = index.permission_filter(allowed)
    assert index.remove(removed) == len(removed)
    made_after_removal = index.permission_filter(allowed)

    admitted = np.zeros(case["n_global"], dtype=bool)
    admitted[doc_ids] = True
    admitted[removed] = False
    for filter, permitted in [(made_before_removal, allowed & admitted), (made_after_removal, allowed & admitted), (None, admitted)]:
        D, I = index.search(queries, k, filter, **exhaustive(index))
        assert D.shape == I.shape == (3, k) and D.dtype == np.float32 and I.dtype == np.int64
        assert permitted[I[I >= 0]].all(), "returned a doc outside the filter, the partition, or deleted"
        assert ((I < 0) == np.isinf(D)).all(), "padding is (inf, -1) together"
        assert (D[:, :-1] <= D[:, 1:]).all(), "distances ascend"
        assert ((I >= 0).sum(axis=1) <= min(k, permitted.sum())).all()
        if index.kind != "hnsw":  # flat, and IVF probing every list, are exact
            D_true, I_true = exact_search(vectors, queries, k, permitted)
            np.testing.assert_array_equal(I, I_true)
            np.testing.assert_allclose(D, D_true, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_filter_admitting_fewer_than_k_docs_pads_and_one_admitting_none_returns_only_padding(kind):
    vectors = clustered(400, 8, seed=1)
    doc_ids = np.arange(100, 500)
    index = PartitionIndex.build(vectors, doc_ids, IndexConfig(kind=kind))
    few = np.zeros(500, dtype=bool)
    few[[150, 250, 499, 7]] = True  # 7 is not in the partition
    D, I = index.search(vectors[:5], 10, index.permission_filter(few), ef=400, nprobe=64)
    assert (np.sort(I[:, :3], axis=1) == [150, 250, 499]).all()
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()

    D, I = index.search(vectors[:5], 10, index.permission_filter(np.zeros(500, dtype=bool)))
    assert (I == -1).all() and np.isinf(D).all()


def test_hnsw_recall_at_10_is_at_least_0_9_against_exact_search_without_a_filter():
    vectors, queries = corpus_and_queries(5000, 200, 32, seed=2)
    index = PartitionIndex.build(vectors, np.arange(5000), IndexConfig(kind="hnsw"))
    _, found = index.search(queries, 10, ef=64)
    _, truth = exact_search(vectors, queries, 10)
    assert recall_at_k(found, truth) >= 0.9


def test_flat_equals_exact_search_with_and_without_a_filter():
    vectors, queries = corpus_and_queries(3000, 50, 16, seed=4)  # ≥ 20 queries: faiss' BLAS path
    index = PartitionIndex.build(vectors, np.arange(3000), IndexConfig(kind="flat"))
    allowed = np.random.default_rng(6).random(3000) < 0.2
    for filter, mask in [(None, None), (index.permission_filter(allowed), allowed)]:
        for q in (queries, queries[:1]):
            D, I = index.search(q, 10, filter)
            D_true, I_true = exact_search(vectors, q, 10, mask)
            np.testing.assert_array_equal(I, I_true)
            np.testing.assert_allclose(D, D_true, rtol=1e-5)


def test_ivf_probing_every_list_equals_exact_search():
    vectors, queries = corpus_and_queries(5000, 30, 16, seed=7)
    index = PartitionIndex.build(vectors, np.arange(5000), IndexConfig(kind="ivf"))
    nlist = index._index.nlist
    assert nlist == ivf_nlist_for(5000) == 5000 // 39  # 4·sqrt(5000) ≈ 283, capped at 39 points per list
    allowed = np.random.default_rng(9).random(5000) < 0.5
    for filter, mask in [(None, None), (index.permission_filter(allowed), allowed)]:
        D, I = index.search(queries, 10, filter, nprobe=nlist)
        D_true, I_true = exact_search(vectors, queries, 10, mask)
        np.testing.assert_array_equal(I, I_true)
        np.testing.assert_allclose(D, D_true, rtol=1e-5)


def test_ivf_nlist_defaults_to_four_root_n_within_one_and_n_over_39():
    assert ivf_nlist_for(10) == 1
    assert ivf_nlist_for(100) == 2
    assert ivf_nlist_for(1_000_000) == 4000
    assert ivf_nlist_for(50, requested=5) == 5
    with pytest.raises(ValueError, match="ivf_nlist=60"):
        ivf_nlist_for(50, requested=60)


@pytest.mark.parametrize("queries", [5, 30])  # faiss' sequential and BLAS paths
def test_filtered_exact_search_equals_numpy_brute_force_breaking_ties_by_smaller_id(queries):
    rng = np.random.default_rng(10)
    vectors = rng.integers(0, 3, size=(300, 3)).astype(np.float32)  # a 3×3×3 grid: ties everywhere
    q = rng.integers(0, 3, size=(queries, 3)).astype(np.float32)
    allowed = rng.random(300) < 0.5
    for k in (1, 7, 40):
        D, I = exact_search(vectors, q, k, allowed)
        D_true, I_true = brute_force(vectors, q, k, allowed)
        np.testing.assert_array_equal(I, I_true)
        np.testing.assert_array_equal(D, D_true.astype(np.float32))


def test_exact_search_pads_when_fewer_docs_are_allowed_than_k():
    vectors = clustered(50, 4, seed=11)
    allowed = np.zeros(50, dtype=bool)
    allowed[[3, 30]] = True
    D, I = exact_search(vectors, vectors[:2], 5, allowed)
    assert set(I[0, :2]) == {3, 30} and (I[:, 2:] == -1).all() and np.isinf(D[:, 2:]).all()
    D, I = exact_search(vectors, vectors[:2], 5, np.zeros(50, dtype=bool))
    assert (I == -1).all() and np.isinf(D).all()
    D, I = exact_search(vectors[:3], vectors[:1], 5)
    assert (I[0, 3:] == -1).all() and np.isinf(D[0, 3:]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_added_doc_is_found_and_a_live_id_cannot_be_added_twice(kind):
    vectors = clustered(500, 8, seed=12)
    index = PartitionIndex.build(vectors, np.arange(500), IndexConfig(kind=kind))
    new = np.full((1, 8), 50.0, dtype=np.float32)  # far from every blob
    index.add(new, np.array([900]))
    assert index.size == 501 and index.doc_ids[-1] == 900
    D, I = index.search(new, 3, ef=64, nprobe=index._index.nlist if kind == "ivf" else None)
    assert I[0, 0] == 900 and D[0, 0] == 0.0

    allowed = np.zeros(901, dtype=bool)
    allowed[900] = True
    _, I = index.search(new, 3, index.permission_filter(allowed), nprobe=64)
    assert I[0].tolist() == [900, -1, -1]

    with pytest.raises(ValueError, match="doc id 900"):
        index.add(new, np.array([900]))
    index.remove(np.array([900]))
    index.add(new + 1, np.array([900]))  # a removed id may come back
    _, I = index.search(new + 1, 1, nprobe=64)
    assert I[0, 0] == 900


@pytest.mark.parametrize("kind", KINDS)
def test_removed_doc_is_never_returned_even_by_a_filter_made_before_the_removal(kind):
    vectors = clustered(500, 8, seed=13)
    index = PartitionIndex.build(vectors, np.arange(500), IndexConfig(kind=kind))
    everyone = index.permission_filter(np.ones(500, dtype=bool))
    _, before = index.search(vectors[:20], 5, everyone, nprobe=64)
    gone = np.unique(before[:, 0])
    assert index.remove(np.concatenate([gone, [10_000]])) == len(gone)  # an unknown id is not counted
    assert index.remove(gone) == 0 and index.size == 500 - len(gone)
    for filter in (None, everyone, index.permission_filter(np.ones(500, dtype=bool))):
        _, I = index.search(vectors[:20], 5, filter, ef=200, nprobe=64)
        assert not np.isin(I, gone).any()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_bytes_gives_identical_results_also_after_removal(kind):
    vectors, queries = corpus_and_queries(2000, 25, 16, seed=14)
    doc_ids = np.arange(0, 4000, 2)
    index = PartitionIndex.build(vectors, doc_ids, IndexConfig(kind=kind))
    allowed = np.random.default_rng(16).random(4000) < 0.3
    for step in ("fresh", "after removal"):
        if step == "after removal":
            index.remove(doc_ids[::3])
        copy = PartitionIndex.from_bytes(index.to_bytes())
        assert copy.kind == kind and copy.size == index.size
        np.testing.assert_array_equal(copy.doc_ids, index.doc_ids)
        for knobs in ({"ef": 16, "nprobe": 2}, {"ef": 128, "nprobe": 16}):
            for mine, theirs in [(None, None), (index.permission_filter(allowed), copy.permission_filter(allowed))]:
                D, I = index.search(queries, 10, mine, **knobs)
                D_copy, I_copy = copy.search(queries, 10, theirs, **knobs)
                np.testing.assert_array_equal(I, I_copy)
                np.testing.assert_array_equal(D, D_copy)


def test_a_filter_only_works_on_the_index_that_made_it_and_masks_must_cover_every_doc():
    vectors = clustered(100, 4, seed=17)
    a = PartitionIndex.build(vectors, np.arange(100), IndexConfig(kind="flat"))
    b = PartitionIndex.build(vectors, np.arange(100), IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match="another PartitionIndex"):
        b.search(vectors[:1], 3, a.permission_filter(np.ones(100, dtype=bool)))
    with pytest.raises(ValueError, match="doc id 99"):
        a.permission_filter(np.ones(99, dtype=bool))
    with pytest.raises(ValueError, match="bool mask"):
        a.permission_filter(np.arange(100))


def test_nbytes_counts_the_vectors_and_grows_with_added_docs():
    vectors = clustered(1000, 32, seed=18)
    for kind in KINDS:
        index = PartitionIndex.build(vectors, np.arange(1000), IndexConfig(kind=kind))
        before = index.nbytes
        assert before >= vectors.nbytes
        index.add(vectors[:100] + 0.5, np.arange(1000, 1100))
        assert index.nbytes > before
    hnsw = PartitionIndex.build(vectors, np.arange(1000), IndexConfig(kind="hnsw"))
    assert hnsw.nbytes > vectors.nbytes + 1000 * 32 * 4  # the graph: about 2·M links per node


def test_recall_at_k_on_hand_made_cases():
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, -1, -1, -1], [-1, -1, -1, -1], [7, -1, -1, -1]])
    # 2/4, 1/2, nothing to find and nothing found, nothing to find but something found
    assert recall_at_k(found, truth) == pytest.approx((0.5 + 0.5 + 1.0 + 0.0) / 4)
    assert recall_at_k(truth[:2], truth[:2]) == 1.0
    assert recall_at_k(np.array([[3, 2, 1]]), np.array([[1, 2, 3]])) == 1.0  # order does not matter


def test_faiss_threads_sets_and_restores_the_openmp_thread_count():
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(RuntimeError), faiss_threads(1):
        raise RuntimeError
    assert faiss.omp_get_max_threads() == before


@pytest.mark.slow
def test_exact_search_over_a_million_docs_takes_seconds():
    import time

    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((1_000_000, 128), dtype=np.float32)
    queries = rng.standard_normal((100, 128), dtype=np.float32)
    allowed = rng.random(1_000_000) < 0.5
    start = time.perf_counter()
    D, I = exact_search(vectors, queries, 10, allowed)
    assert time.perf_counter() - start < 20
    assert allowed[I].all() and (D[:, :-1] <= D[:, 1:]).all()
    candidates = np.flatnonzero(allowed)
    for q in range(2):
        dist = ((vectors[candidates] - queries[q]) ** 2).sum(1)
        np.testing.assert_array_equal(I[q], candidates[np.argsort(dist, kind="stable")[:10]])


def test_exact_scan_of_an_hnsw_partition_equals_exact_search_and_respects_deletes():
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    index = PartitionIndex.build(vectors, np.arange(2000), IndexConfig("hnsw"))
    allowed = rng.random(2000) < 0.03
    flt = index.permission_filter(allowed)
    queries = rng.normal(size=(6, 16)).astype(np.float32)
    _, found = index.search(queries, 10, flt, exact=True)
    _, truth = exact_search(vectors, queries, 10, allowed)
    assert (found == truth).all()
    gone = np.flatnonzero(allowed)[:20]
    index.remove(gone)
    _, found = index.search(queries, 10, flt, exact=True)
    assert not np.isin(found, gone).any() and allowed[found[found >= 0]].all()
    ivf = PartitionIndex.build(vectors, np.arange(2000), IndexConfig("ivf"))
    with pytest.raises(ValueError, match="exact"):
        ivf.search(queries, 10, exact=True)
