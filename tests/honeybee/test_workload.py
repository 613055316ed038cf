"""HoneyBee workloads: the generator's enterprise-RBAC shape, the folder round trip, and bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from infra.errors import InputError
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.workload import (ALL_STAFF, FILES, SCALES, Workload, describe, ensure_generated, generate_workload,
                                     load_workload, save_workload)


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return generate_workload("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory) -> Path:
    return save_workload(tiny, tmp_path_factory.mktemp("tiny") / "workload")


def assert_same_workload(a: Workload, b: Workload) -> None:
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.queries, b.queries)
    pd.testing.assert_frame_equal(a.doc_roles, b.doc_roles)
    pd.testing.assert_frame_equal(a.user_roles, b.user_roles)
    assert list(a.query_users) == list(b.query_users)


# --------------------------------------------------------------------------- generator


def test_generation_is_deterministic_for_a_seed(tiny):
    assert_same_workload(generate_workload("tiny", seed=0), tiny)
    other = generate_workload("tiny", seed=1)
    assert not np.array_equal(other.vectors, tiny.vectors)
    assert not other.doc_roles.equals(tiny.doc_roles)


def test_generated_workload_meets_the_workload_contract(tiny):
    n_docs, dim = tiny.vectors.shape
    assert (n_docs, dim) == (SCALES["tiny"].n_docs, SCALES["tiny"].dim)
    assert tiny.vectors.dtype == np.float32 and tiny.vectors.flags.c_contiguous
    assert tiny.queries.shape == (SCALES["tiny"].n_queries, dim) and tiny.queries.dtype == np.float32
    assert tiny.doc_roles["doc_id"].dtype == np.int64
    assert set(tiny.doc_roles["doc_id"]) == set(range(n_docs)), "every doc has a role"
    assert not tiny.doc_roles.duplicated().any() and not tiny.user_roles.duplicated().any()
    assert set(tiny.user_roles["role"]) <= set(tiny.doc_roles["role"]), "every role a user holds grants a doc"
    assert set(tiny.query_users) <= set(tiny.user_roles["user"])
    assert len(set(tiny.doc_roles["role"])) == SCALES["tiny"].n_roles


def test_docs_are_granted_to_their_team_department_and_division(tiny):
    """Team roles are named division.department.team; a doc has exactly one team and inherits upward."""
    for doc, roles in tiny.doc_roles.groupby("doc_id")["role"]:
        teams = [r for r in roles if ".team" in r]
        assert len(teams) == 1, (doc, list(roles))
        department, _ = teams[0].rsplit(".", 1)
        division, _ = department.split(".")
        assert {department, division} <= set(roles)


def test_every_user_belongs_to_one_team_and_most_but_not_all_are_staff(tiny):
    held = tiny.user_roles.groupby("user")["role"].apply(set)
    assert all(sum(".team" in r for r in roles) == 1 for roles in held)
    staff = np.mean([ALL_STAFF in roles for roles in held])
    assert 0.4 < staff < 0.8


def test_role_sizes_are_skewed(tiny):
    stats = describe(tiny)
    assert stats["role_size_max"] > 5 * stats["role_size_median"] > 5 * stats["role_size_min"]


def test_queries_come_mostly_near_documents_their_user_may_see(tiny):
    rbac = Rbac.of(tiny)
    distances = (tiny.queries ** 2).sum(1)[:, None] - 2 * tiny.queries @ tiny.vectors.T + (tiny.vectors ** 2).sum(1)[None]
    nearest = distances.argmin(axis=1)
    permitted = [rbac.user_mask(user)[doc] for user, doc in zip(tiny.query_users, nearest)]
    assert np.mean(permitted) >= 0.75


def test_query_activity_is_skewed_over_users(tiny):
    asked = pd.Series(tiny.query_users).value_counts()
    assert asked.iloc[0] >= 5 * len(tiny.query_users) / SCALES["tiny"].n_users


@pytest.fixture(scope="module")
def small() -> Workload:
    return generate_workload("small", seed=0)


def test_some_users_manage_their_department_or_division(small):
    """Roughly 10% hold their department role, 2% their division role, and only their own."""
    held = small.user_roles.groupby("user")["role"].apply(set)
    teams = held.apply(lambda roles: next(r for r in roles if ".team" in r))
    departments = [{r for r in roles if ".dept" in r and ".team" not in r} for roles in held]
    divisions = [{r for r in roles if r.startswith("div") and "." not in r} for roles in held]
    assert 0.05 < np.mean([bool(d) for d in departments]) < 0.15
    assert 0.005 < np.mean([bool(d) for d in divisions]) < 0.04
    for team, department, division in zip(teams, departments, divisions):
        assert department <= {team.rsplit(".", 1)[0]} and division <= {team.split(".")[0]}


def test_small_scale_spans_narrow_to_broad_users(small):
    """The benchmark needs users who see almost nothing and users who see a third of the corpus or more."""
    stats = describe(small)
    assert stats["user_selectivity_min"] <= 0.005
    assert stats["user_selectivity_max"] >= 0.30
    assert stats["per_role_storage"] > 2, "docs are granted to several roles"
    assert stats["per_user_storage"] > stats["per_role_storage"], "an index per user class costs more than per role"


def test_describe_is_json_and_counts_the_workload(tiny):
    stats = json.loads(json.dumps(describe(tiny)))
    assert stats["n_docs"] == 3000 and stats["dim"] == 32 and stats["n_queries"] == 200
    assert stats["roles_per_doc_mean"] == pytest.approx(len(tiny.doc_roles) / 3000)
    assert stats["per_role_storage"] == pytest.approx(stats["roles_per_doc_mean"])
    assert 0 < stats["user_selectivity_min"] <= stats["user_selectivity_p50"] <= stats["user_selectivity_max"] <= 1


def test_an_unknown_scale_is_an_input_error():
    with pytest.raises(InputError, match="huge"):
        generate_workload("huge")


# --------------------------------------------------------------------------- folder round trip


def test_save_then_load_gives_the_same_workload(tiny, tiny_folder):
    assert sorted(p.name for p in tiny_folder.iterdir()) == sorted(FILES)
    loaded = load_workload(tiny_folder)
    assert_same_workload(loaded, tiny)
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.flags.c_contiguous
    assert loaded.name == tiny_folder.name


def test_names_stay_text_through_a_folder(tmp_path):
    """"007" is a user name, not the number 7."""
    workload = Workload(
        vectors=np.eye(3, dtype=np.float32),
        doc_roles=pd.DataFrame({"doc_id": np.array([0, 1, 2, 2], dtype=np.int64), "role": ["0042", "0042", "NA", "a,b"]}),
        user_roles=pd.DataFrame({"user": ["007", "007", "7"], "role": ["0042", "NA", "a,b"]}),
        queries=np.ones((2, 3), dtype=np.float32),
        query_users=np.array(["007", "7"], dtype=object),
    )
    loaded = load_workload(save_workload(workload, tmp_path / "names"))
    assert_same_workload(loaded, workload)


def test_float64_vectors_are_read_as_float32(tiny, tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "w")
    np.save(folder / "vectors.npy", tiny.vectors.astype(np.float64))
    loaded = load_workload(folder)
    assert loaded.vectors.dtype == np.float32
    np.testing.assert_array_equal(loaded.vectors, tiny.vectors)


def test_ensure_generated_writes_a_scale_once_and_redoes_a_save_cut_short(tiny, tmp_path):
    folder = ensure_generated("tiny", seed=0, root=tmp_path)
    assert_same_workload(load_workload(folder), tiny)
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_generated("tiny", seed=0, root=tmp_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written, "reused, not rewritten"
    (folder / "queries.npy").unlink()
    assert_same_workload(load_workload(ensure_generated("tiny", seed=0, root=tmp_path)), tiny)
    with pytest.raises(InputError, match="huge"):
        ensure_generated("huge", root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# --------------------------------------------------------------------------- bad folders


def edit_lines(name: str, edit: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    return apply


def replace_cell(name: str, line: int, column: int, text: str) -> Callable[[Path], None]:
    """Set one cell; ``line`` is 1-based (line 1 is the header)."""
    def edit(lines: list[str]) -> list[str]:
        cells = lines[line - 1].split(",")
        cells[column] = text
        lines[line - 1] = ",".join(cells)
        return lines
    return edit_lines(name, edit)


def save_array(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        np.save(folder / name, change(np.load(folder / name)))
    return apply


def with_value(array: np.ndarray, row: int, column: int, value: float) -> np.ndarray:
    array = array.copy()
    array[row, column] = value
    return array


def drop_doc(doc: int) -> Callable[[Path], None]:
    return edit_lines("doc_roles.csv", lambda lines: [l for l in lines if l.split(",")[0] != str(doc)])


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


# (case, file, how to break the folder, field, value, words of the reason)
BAD_FOLDERS = [
    *[(f"missing {name}", name, lambda folder, n=name: (folder / n).unlink(), "<file>", None, "file not found")
      for name in FILES],
    ("npy not an array", "vectors.npy", write_bytes("vectors.npy", b"these are not vectors"), "<file>", None,
     "not a readable .npy"),
    ("csv unterminated quote", "doc_roles.csv", edit_lines("doc_roles.csv", lambda l: [*l, '7,"unterminated']),
     "<file>", None, "not a readable CSV"),
    ("csv row with an extra field", "user_roles.csv", edit_lines("user_roles.csv", lambda l: [*l, "user000,extra,field"]),
     "<file>", None, "not a readable CSV"),
    ("empty csv", "query_users.csv", write_bytes("query_users.csv", b""), "<file>", None, "not a readable CSV"),
    ("csv missing a header column", "user_roles.csv", replace_cell("user_roles.csv", 1, 1, "group"),
     "header", "user,group", "missing column(s) role"),
    ("vectors not 2-D", "vectors.npy", save_array("vectors.npy", np.ravel), "shape", (96000,), "2-D"),
    ("vectors not float", "vectors.npy", save_array("vectors.npy", lambda a: a.astype(np.int32)), "dtype", "int32",
     "float"),
    ("NaN in vectors", "vectors.npy", save_array("vectors.npy", lambda a: with_value(a, 17, 3, np.nan)), "row 17",
     float("nan"), "column 3"),
    ("inf in queries", "queries.npy", save_array("queries.npy", lambda a: with_value(a, 5, 0, np.inf)), "row 5",
     float("inf"), "finite"),
    ("float64 overflowing float32", "vectors.npy",
     save_array("vectors.npy", lambda a: with_value(a.astype(np.float64), 9, 1, 1e300)), "row 9", 1e300, "float32 range"),
    ("queries of another dimension", "queries.npy", save_array("queries.npy", lambda a: a[:, :16]), "shape[1]", 16,
     "vectors.npy has 32"),
    ("doc id not an integer", "doc_roles.csv", replace_cell("doc_roles.csv", 3, 0, "x7"), "doc_id (line 3)", "x7",
     "not an integer"),
    ("doc id past the vectors", "doc_roles.csv", replace_cell("doc_roles.csv", 3, 0, "3000"), "doc_id (line 3)", 3000,
     "vectors/ids mismatch"),
    ("negative doc id", "doc_roles.csv", replace_cell("doc_roles.csv", 4, 0, "-1"), "doc_id (line 4)", -1,
     "vectors/ids mismatch"),
    ("doc without a role", "doc_roles.csv", drop_doc(42), "doc_id", 42, "has no role"),
    ("empty role name", "doc_roles.csv", replace_cell("doc_roles.csv", 5, 1, ""), "role (line 5)", "", "empty role"),
    ("empty user name", "user_roles.csv", replace_cell("user_roles.csv", 2, 0, " "), "user (line 2)", " ", "empty user"),
    ("duplicate query id", "query_users.csv", replace_cell("query_users.csv", 3, 0, "0"), "query_id (line 3)", "0",
     "duplicate query_id"),
    ("query without a user", "query_users.csv", edit_lines("query_users.csv", lambda l: l[:8] + l[9:]), "query_id", 7,
     "exactly once"),
    ("query id past the queries", "query_users.csv", replace_cell("query_users.csv", 2, 0, "200"),
     "query_id (line 2)", 200, "0..199"),
    ("unknown user", "query_users.csv", replace_cell("query_users.csv", 4, 1, "nobody"), "user (line 4)", "nobody",
     "unknown user"),
    ("unknown role", "user_roles.csv", replace_cell("user_roles.csv", 3, 1, "ghost-role"), "role (line 3)", "ghost-role",
     "unknown role: not in doc_roles.csv"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_rejected(folder: Path, name: str, field: str, value: object, reason: str) -> None:
    """Loading ``folder`` raises an InputError naming ``name``, ``field`` and ``value``, and leaves the folder as it was."""
    before = snapshot(folder)
    with pytest.raises(InputError) as caught:
        load_workload(folder)
    error, message = caught.value, str(caught.value)
    assert error.source == str(folder / name) and str(folder / name) in message
    assert error.field == field and repr(field) in message
    assert repr(error.value) == repr(value) and repr(value) in message
    assert reason in message
    assert snapshot(folder) == before, "the loader must not touch the folder"


@pytest.mark.parametrize("case, name, corrupt, field, value, reason", BAD_FOLDERS, ids=[c[0] for c in BAD_FOLDERS])
def test_a_bad_folder_is_an_input_error_naming_file_field_and_value(tiny_folder, tmp_path, case, name, corrupt, field,
                                                                   value, reason):
    folder = shutil.copytree(tiny_folder, tmp_path / "workload")
    corrupt(folder)
    assert_rejected(folder, name, field, str(folder / name) if field == "<file>" else value, reason)


def test_a_duplicate_grant_is_an_input_error_naming_the_pair_and_both_lines(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "workload")
    lines = (folder / "doc_roles.csv").read_text().splitlines()
    (folder / "doc_roles.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    assert_rejected(folder, "doc_roles.csv", f"doc_id,role (line {len(lines) + 1})", lines[1],
                    "duplicate (doc_id, role): already on line 2")


def test_a_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        load_workload(tmp_path / "nowhere")


def test_the_workload_tables_have_contracts_that_name_bad_values(tiny):
    from data_contracts import ContractError, products, validate

    assert {"honeybee.doc_roles", "honeybee.user_roles", "honeybee.query_users"} <= set(products())
    validate(tiny.doc_roles, "honeybee.doc_roles")
    validate(tiny.user_roles, "honeybee.user_roles")
    bad = pd.DataFrame({"doc_id": np.array([0, -3], dtype=np.int64), "role": ["eng", ""]})
    with pytest.raises(ContractError) as caught:
        validate(bad, "honeybee.doc_roles", "doc_roles.csv")
    assert "doc_roles.csv" in str(caught.value) and "[-3]" in str(caught.value) and "['']" in str(caught.value)
    with pytest.raises(ContractError, match=r"query_id.*unexpected \[4, 4\]"):
        validate(pd.DataFrame({"query_id": np.array([4, 4]), "user": ["u", "v"]}), "honeybee.query_users")
