"""The permission model: masks, blocks and user classes match a brute-force reading of the grants."""

from __future__ import annotations

from itertools import chain, combinations

import numpy as np
import pandas as pd
import pytest

from infra.errors import InputError
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.workload import generate_workload

# Six docs, four roles; alice and dave hold the same roles, erin only the company-wide one.
GRANTS = {0: {"eng"}, 1: {"eng", "all"}, 2: {"sales"}, 3: {"sales", "all"}, 4: {"hr"}, 5: {"eng", "sales"}}
HOLDS = {"alice": {"eng"}, "bob": {"sales", "all"}, "carol": {"hr"}, "dave": {"eng"}, "erin": {"all"}}


def frame(pairs: list[tuple], columns: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(pairs, columns=columns)
    if "doc_id" in out:
        out["doc_id"] = out["doc_id"].astype(np.int64)
    return out


@pytest.fixture(scope="module")
def example() -> Rbac:
    doc_roles = frame([(d, r) for d, roles in GRANTS.items() for r in sorted(roles)], ["doc_id", "role"])
    user_roles = frame([(u, r) for u, roles in HOLDS.items() for r in sorted(roles)], ["user", "role"])
    return Rbac(6, doc_roles.sample(frac=1, random_state=0), user_roles)  # the order of rows does not matter


@pytest.fixture(scope="module")
def tiny():
    workload = generate_workload("tiny", seed=0)
    return workload, Rbac.of(workload)


def brute_force_mask(grants: dict[int, set[str]], n_docs: int, roles: set[str]) -> np.ndarray:
    return np.array([bool(grants.get(d, set()) & roles) for d in range(n_docs)])


def test_roles_and_users_are_sorted_names(example):
    assert example.roles == ["all", "eng", "hr", "sales"]
    assert example.users == ["alice", "bob", "carol", "dave", "erin"]
    assert example.n_docs == 6


def test_permitted_mask_matches_brute_force_for_every_role_set(example):
    roles = ["all", "eng", "hr", "sales", "ghost"]  # a role that grants nothing sees nothing
    for subset in chain.from_iterable(combinations(roles, k) for k in range(len(roles) + 1)):
        expected = brute_force_mask(GRANTS, 6, set(subset))
        np.testing.assert_array_equal(example.permitted_mask(frozenset(subset)), expected, err_msg=str(subset))


def test_user_mask_is_the_mask_of_the_users_roles(example):
    for user, roles in HOLDS.items():
        assert example.user_roles_of(user) == frozenset(roles)
        np.testing.assert_array_equal(example.user_mask(user), brute_force_mask(GRANTS, 6, roles))


def test_role_docs_are_sorted_int64_ids(example):
    np.testing.assert_array_equal(example.role_docs("eng"), [0, 1, 5])
    assert example.role_docs("eng").dtype == np.int64
    assert len(example.role_docs("ghost")) == 0


def test_blocks_group_docs_by_exact_role_set_in_signature_order(example):
    blocks = [(tuple(sorted(signature)), docs.tolist()) for signature, docs in example.blocks()]
    assert blocks == [
        (("all", "eng"), [1]),
        (("all", "sales"), [3]),
        (("eng",), [0]),
        (("eng", "sales"), [5]),
        (("hr",), [4]),
        (("sales",), [2]),
    ]
    assert example.doc_role_sets() == [frozenset(GRANTS[d]) for d in range(6)]


def test_user_classes_group_users_with_the_same_roles(example):
    assert example.user_classes() == {
        frozenset({"all"}): ["erin"],
        frozenset({"all", "sales"}): ["bob"],
        frozenset({"eng"}): ["alice", "dave"],
        frozenset({"hr"}): ["carol"],
    }


def test_an_unknown_user_is_an_input_error_naming_the_user(example):
    with pytest.raises(InputError) as caught:
        example.user_roles_of("mallory")
    assert caught.value.source == "query" and caught.value.field == "user" and caught.value.value == "mallory"
    assert "'mallory'" in str(caught.value) and "unknown user" in str(caught.value)


def test_permitted_masks_are_cached_and_read_only(example):
    mask = example.permitted_mask(frozenset({"eng"}))
    assert example.user_mask("alice") is mask
    with pytest.raises(ValueError):
        mask[0] = False


def test_permitted_counts_match_the_masks(example):
    role_sets = [frozenset(s) for s in ({"eng"}, {"all", "hr"}, set(), {"ghost", "sales"})]
    assert example.permitted_counts(role_sets).tolist() == [int(example.permitted_mask(s).sum()) for s in role_sets]


def test_a_doc_without_roles_forms_the_empty_signature_block():
    rbac = Rbac(3, frame([(0, "a"), (2, "a"), (2, "a")], ["doc_id", "role"]), frame([("u", "a")], ["user", "role"]))
    assert [(set(s), docs.tolist()) for s, docs in rbac.blocks()] == [(set(), [1]), ({"a"}, [0, 2])]


def test_generated_masks_match_brute_force_for_every_user(tiny):
    workload, rbac = tiny
    grants: dict[int, set[str]] = {}
    for doc, role in zip(workload.doc_roles["doc_id"], workload.doc_roles["role"]):
        grants.setdefault(int(doc), set()).add(role)
    holds = workload.user_roles.groupby("user")["role"].apply(set)
    assert rbac.users == sorted(holds.index)
    for user, roles in holds.items():
        np.testing.assert_array_equal(rbac.user_mask(user), brute_force_mask(grants, rbac.n_docs, roles), err_msg=user)
    for role in rbac.roles:
        np.testing.assert_array_equal(rbac.role_docs(role), sorted(d for d, rs in grants.items() if role in rs))


def test_generated_blocks_partition_the_docs_by_role_set(tiny):
    workload, rbac = tiny
    blocks = rbac.blocks()
    docs = np.concatenate([d for _, d in blocks])
    assert len(docs) == rbac.n_docs and set(docs.tolist()) == set(range(rbac.n_docs)), "disjoint and covering"
    role_sets = workload.doc_roles.groupby("doc_id")["role"].apply(frozenset)
    for signature, block in blocks:
        assert block.dtype == np.int64 and np.all(np.diff(block) > 0)
        assert all(role_sets[d] == signature for d in block)
    signatures = [tuple(sorted(s)) for s, _ in blocks]
    assert signatures == sorted(signatures) and len(set(signatures)) == len(signatures)
    assert rbac.doc_role_sets() == [role_sets[d] for d in range(rbac.n_docs)]


def test_generated_user_classes_cover_every_user_once(tiny):
    _, rbac = tiny
    classes = rbac.user_classes()
    members = [u for users in classes.values() for u in users]
    assert sorted(members) == rbac.users
    assert all(rbac.user_roles_of(u) == roles for roles, users in classes.items() for u in users)
    counts = rbac.permitted_counts(list(classes))
    assert counts.tolist() == [int(rbac.permitted_mask(roles).sum()) for roles in classes]
