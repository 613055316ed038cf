"""Incremental updates: permissions, users and documents change; partitions follow without a rebuild,
and no search ever returns what a user may not see."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.errors import InputError
from tasks.honeybee.changes import Change, Tables, apply_changes, read_changes
from tasks.honeybee.index import exact_search
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.update import LiveDeployment
from tasks.honeybee.workload import generate_workload
from tests.honeybee.test_security import ALL_FLAT, ALL_HNSW, ALL_IVF, rbac_workloads


ALL_OPS = ("grant", "revoke", "join", "leave", "add_doc", "delete_doc")


def random_changes(tables: Tables, rng: np.random.Generator, count: int, ops=ALL_OPS) -> list[Change]:
    """Valid changes against ``tables``: each drawn op is made to fit the tables as they evolve."""
    changes = []
    for _ in range(count):
        grants = set(zip(tables.doc_roles.doc_id.astype(int), tables.doc_roles.role))
        held = set(zip(tables.user_roles.user, tables.user_roles.role))
        roles = sorted({r for _, r in grants})
        live = sorted(set(range(len(tables.vectors))) - tables.deleted)
        op = rng.choice(list(ops))
        change = None
        if op == "grant" and live and roles:
            doc, role = int(rng.choice(live)), str(rng.choice(roles))
            if (doc, role) not in grants:
                change = Change("grant", doc=doc, role=role)
        elif op == "revoke" and grants:
            doc, role = sorted(grants)[int(rng.integers(len(grants)))]
            change = Change("revoke", doc=doc, role=role)
        elif op == "join" and roles:
            user, role = f"u{int(rng.integers(0, 9))}", str(rng.choice(roles))
            if (user, role) not in held:
                change = Change("join", user=user, role=role)
        elif op == "leave" and held:
            user, role = sorted(held)[int(rng.integers(len(held)))]
            change = Change("leave", user=user, role=role)
        elif op == "add_doc" and roles:
            vector = tuple(float(v) for v in rng.normal(size=tables.vectors.shape[1]))
            change = Change("add_doc", doc=len(tables.vectors), roles=(str(rng.choice(roles)),), vector=vector)
        elif op == "delete_doc" and len(live) > 1:
            change = Change("delete_doc", doc=int(rng.choice(live)))
        if change is not None:
            tables = apply_changes(tables, [change])
            changes.append(change)
    return changes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(workload=rbac_workloads(), seed=st.integers(0, 2**16), batches=st.integers(1, 3),
       model=st.sampled_from([ALL_HNSW, ALL_FLAT, ALL_IVF]))
def test_after_any_update_sequence_searches_return_only_permitted_documents(workload, seed, batches, model):
    rng = np.random.default_rng(seed)
    live = LiveDeployment(workload, model, storage_budget=float(rng.uniform(1.0, 2.5)), recall_target=0.9)
    for _ in range(batches):
        live.apply(random_changes(live.tables, rng, int(rng.integers(1, 8))))
        truth = Rbac(len(live.tables.vectors), live.tables.doc_roles, live.tables.user_roles)
        users = sorted(set(live.tables.user_roles.user))
        queries = rng.normal(size=(len(users), live.tables.vectors.shape[1])).astype(np.float32)
        found = live.search(queries, users, k=5)
        for q, user in enumerate(users):
            permitted = truth.user_mask(user)
            ids = found[q][found[q] >= 0]
            assert permitted[ids].all(), f"{user} got {ids[~permitted[ids]]}"
            assert len(set(ids)) == len(ids)
            if model is ALL_FLAT:  # exact partitions: exactly the permitted top-k, so nothing is missing either
                _, expected = exact_search(live.tables.vectors, queries[q : q + 1], 5, permitted)
                assert list(ids) == [i for i in expected[0] if i >= 0]


@pytest.fixture(scope="module")
def tiny_live():
    from tests.honeybee.test_security import ALL_HNSW

    return LiveDeployment(generate_workload("tiny", seed=5), ALL_HNSW.with_floor(0.95))


def test_a_small_change_touches_a_small_share_of_what_a_rebuild_indexes(tiny_live):
    rng = np.random.default_rng(0)
    changes = random_changes(tiny_live.tables, rng, 10, ops=("grant", "revoke", "leave", "add_doc", "delete_doc"))
    report = tiny_live.apply(changes, compare_with_fresh_plan=True)
    assert report.changes == 10 and report.partitions_created == 0
    assert 0 < report.vectors_added + report.vectors_removed < 0.1 * report.full_rebuild_vectors
    assert report.full_rebuild_seconds is not None and report.fresh_plan_predicted_latency_ms > 0
    assert json.dumps(report.to_dict())


def test_joining_a_role_no_partition_serves_creates_its_partition_and_routes_the_user(tiny_live):
    served = set().union(*tiny_live.plan.partitions)
    unserved = sorted(set(tiny_live.tables.doc_roles.role) - served)
    if not unserved:
        pytest.skip("every role is served")
    report = tiny_live.apply([Change("join", user="newcomer", role=unserved[0])])
    assert report.partitions_created == 1 and report.classes_rerouted >= 1
    truth = Rbac(len(tiny_live.tables.vectors), tiny_live.tables.doc_roles, tiny_live.tables.user_roles)
    docs = truth.role_docs(unserved[0])[:5]
    found = tiny_live.search(tiny_live.tables.vectors[docs], ["newcomer"] * len(docs), k=3)
    assert (found[:, 0] == docs).all()  # each document is its own nearest neighbour, and now visible


def test_a_revoked_grant_is_never_returned_even_before_its_vector_leaves_the_index(tiny_live):
    tables = tiny_live.tables
    truth = Rbac(len(tables.vectors), tables.doc_roles, tables.user_roles)
    sets = truth.doc_role_sets()
    for user in truth.users:  # a user who sees some documents through exactly one of its roles
        held = truth.user_roles_of(user)
        role = sorted(held)[0]
        docs = [d for d in truth.role_docs(role) if sets[d] & held == {role}][:3]
        if docs:
            break
    tiny_live.apply([Change("revoke", doc=int(d), role=role) for d in docs])
    found = tiny_live.search(tables.vectors[docs], [user] * len(docs), k=10)
    assert len(docs) == 3 and not np.isin(found, docs).any()


def test_a_bad_change_names_the_line_and_value_and_applies_nothing(tmp_path, tiny_live):
    before = tiny_live.tables.doc_roles.copy()
    path = tmp_path / "changes.jsonl"
    doc, role = before.iloc[0]
    first = json.dumps({"op": "revoke", "doc": int(doc), "role": role})  # valid on its own
    path.write_text(first + '\n{"op": "grant", "doc": 99999999, "role": "x"}\n')
    changes = read_changes(path)
    with pytest.raises(InputError) as err:
        tiny_live.apply(changes)
    assert f"{path}:2" in str(err.value) and "99999999" in str(err.value)
    assert tiny_live.tables.doc_roles.equals(before)


@pytest.mark.parametrize("line, field", [
    ('{"op": "promote", "user": "a"}', "op"),
    ('{"op": "join", "user": "a"}', "role"),
    ('{"op": "add_doc", "doc": 5, "roles": [], "vector": [1.0]}', "roles"),
    ('{"op": "add_doc", "doc": 5, "roles": ["r"], "vector": [NaN]}', "vector"),
    ('{"op": "grant", "doc": -1, "role": "r"}', "doc"),
    ('[1, 2]', "<line>"),
    ('{"op": "grant", "doc": 1, "role": "r", "extra": 1}', "extra"),
])
def test_malformed_change_lines_are_refused_with_their_field(tmp_path, line, field):
    path = tmp_path / "changes.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError) as err:
        read_changes(path)
    assert err.value.field == field and f"{path}:1" in str(err.value)
