"""Security first: no strategy ever returns a document the querying user may not see.

Property-based: random RBAC graphs (documents granted to random role sets, users holding
random roles), random queries and storage budgets, every strategy, HNSW and exact-scan
partitions — each answer is checked against the ground-truth permissions with zero
tolerance.
"""

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizers.honeybee import STRATEGIES
from optimizers.honeybee_cost import SearchCostModel
from tasks.honeybee.local import run_locally
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.workload import Workload

# Models that force every partition to one index kind, so every search path is exercised.
ALL_HNSW = SearchCostModel(k=10, recall_floor=0.9, hnsw_recall=(3.7, 1.0, 0.39, -0.53),
                           hnsw_latency=(-12.9, -0.21, 0.086, 0.36), flat_latency=(1.0, 0.0, 0.0, 0.0, 1000.0), ef_range=(16, 2048))
ALL_FLAT = SearchCostModel(k=10, recall_floor=0.9, hnsw_recall=(3.7, 1.0, 0.39, -0.53),
                           hnsw_latency=(0.0, 0.0, 0.0, 0.0), flat_latency=(2e-5, 5e-10, 9e-9, 0.0, 1000.0), ef_range=(16, 2048))
ALL_IVF = SearchCostModel(k=10, recall_floor=0.9, hnsw_recall=(3.7, 1.0, 0.39, -0.53),
                          hnsw_latency=(0.0, 0.0, 0.0, 0.0), flat_latency=(1.0, 0.0, 0.0, 0.0, 1000.0), ef_range=(16, 2048),
                          ivf_recall=(3.0, 1.2, 0.3, 0.0), ivf_latency=(1e-5, 0.0, 1e-9, 1e-9))


@st.composite
def rbac_workloads(draw):
    n_roles = draw(st.integers(1, 6))
    roles = [f"role{i}" for i in range(n_roles)]
    n_docs = draw(st.integers(12, 90))
    role_sets = st.sets(st.sampled_from(roles), min_size=1, max_size=n_roles)
    doc_roles = [(d, r) for d in range(n_docs) for r in sorted(draw(role_sets))]
    granted = sorted({r for _, r in doc_roles})
    n_users = draw(st.integers(1, 7))
    user_roles = [(f"u{u}", r) for u in range(n_users)
                  for r in sorted(draw(st.sets(st.sampled_from(granted), min_size=1, max_size=len(granted))))]
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_docs, 4)).astype(np.float32)
    n_queries = draw(st.integers(1, 8))
    queries = rng.normal(size=(n_queries, 4)).astype(np.float32)
    query_users = np.array([f"u{int(u)}" for u in rng.integers(0, n_users, n_queries)], dtype=object)
    return Workload(vectors, pd.DataFrame(doc_roles, columns=["doc_id", "role"]),
                    pd.DataFrame(user_roles, columns=["user", "role"]), queries, query_users, name="random")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workload=rbac_workloads(), k=st.integers(1, 12), budget=st.floats(1.0, 3.0),
       model=st.sampled_from([ALL_HNSW, ALL_FLAT, ALL_IVF]))
def test_no_strategy_returns_a_document_the_user_may_not_see(workload, k, budget, model):
    rbac = Rbac.of(workload)
    runs = run_locally(workload, list(STRATEGIES), model, k=k, storage_budget=budget, recall_target=0.9)
    for strategy, local in runs.items():
        assert local.run.rejected_at_merge == 0, f"{strategy}: a partition search returned a forbidden document"
        for q, found in enumerate(local.run.found):
            permitted = rbac.user_mask(workload.query_users[q])
            ids = found[found >= 0]
            assert permitted[ids].all(), f"{strategy} returned {ids[~permitted[ids]]} to {workload.query_users[q]}"
            assert len(set(ids)) == len(ids), f"{strategy} returned a document twice"
            if model is ALL_FLAT:  # exact scans: exactly the top-k the user may see
                assert len(ids) == min(k, int(permitted.sum()))
