"""After `tierflow honeybee update`, every read of the workload answers from the updated
permissions and documents: `query`, the flow's workers, the deployment — never from the
workload folder's own (older) grants, which the update leaves untouched.

The checks use a cost model that makes every HoneyBee partition an exact scan (ALL_FLAT), so
a query's answer is exactly the top-k of what its user may see: a document that must appear
does, and one that must not, does not.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infra.errors import InputError
from optimizers.honeybee import STRATEGIES
from tasks.honeybee.changes import Change, Tables, apply_changes
from tasks.honeybee.index import exact_search
from tasks.honeybee.local import run_locally
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.update import update_workload
from tasks.honeybee.workload import (
    Workload, current_state, generate_workload, load_workload, save_workload, state_link,
)
from tests.honeybee.test_security import ALL_FLAT

TIERFLOW = str(Path(sys.executable).with_name("tierflow"))
K = 5


@pytest.fixture(scope="module")
def original() -> Workload:
    return generate_workload("tiny", seed=3)


@pytest.fixture
def folder(original, tmp_path) -> Path:
    return save_workload(original, tmp_path / "workload")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def truth_after(workload: Workload, changes: list[Change]) -> Rbac:
    """Who may see what after ``changes``, worked out from the original tables (not from any state)."""
    tables = apply_changes(Tables(workload.vectors, workload.doc_roles, workload.user_roles), changes)
    return Rbac(len(tables.vectors), tables.doc_roles, tables.user_roles, workload.query_users)


def exact_answers(workload: Workload, rbac: Rbac, vectors: np.ndarray | None = None) -> np.ndarray:
    vectors = workload.vectors if vectors is None else vectors
    return np.vstack([exact_search(vectors, workload.queries[q], K, rbac.user_mask(user))[1]
                      for q, user in enumerate(workload.query_users)])


def seen_through_one_role(workload: Workload) -> tuple[int, str, int, str]:
    """(query, user, doc, role): ``doc`` is in the query's answer and its user sees it only through ``role``."""
    rbac = Rbac.of(workload)
    sets = rbac.doc_role_sets()
    for q, ids in enumerate(exact_answers(workload, rbac)):
        user = workload.query_users[q]
        held = rbac.user_roles_of(user)
        for doc in ids:
            via = sets[doc] & held
            if len(via) == 1:
                return q, user, int(doc), next(iter(via))
    raise AssertionError("no document is seen through exactly one role")


def just_out_of_reach(workload: Workload) -> tuple[int, str, int]:
    """(query, user, doc): ``doc`` is the query's nearest document overall, which its user may not see."""
    rbac = Rbac.of(workload)
    _, nearest = exact_search(workload.vectors, workload.queries, 1)
    for q, user in enumerate(workload.query_users):
        if not rbac.user_mask(user)[nearest[q, 0]]:
            return q, user, int(nearest[q, 0])
    raise AssertionError("every query's nearest document is permitted")


def answers(workload: Workload, strategies=("honeybee",)) -> dict[str, np.ndarray]:
    runs = run_locally(workload, list(strategies), ALL_FLAT, k=K, recall_target=0.9)
    return {s: r.run.found for s, r in runs.items()}


def update(folder: Path, changes: list[Change], **kwargs):
    return update_workload(folder, changes, lambda _: ALL_FLAT, recall_target=0.9, compare_with_fresh_plan=False,
                           **kwargs)


# --------------------------------------------------------------------------- library: load_workload answers from the state


def test_a_revoked_document_is_gone_from_every_strategys_answers_and_the_workload_is_untouched(original, folder):
    q, user, doc, role = seen_through_one_role(original)
    assert doc in answers(load_workload(folder))["honeybee"][q], "before the update the user gets the document"
    before = files_of(folder)
    changes = [Change("revoke", doc=doc, role=role)]
    outcome = update(folder, changes)
    assert outcome.forbidden_results == 0

    updated = load_workload(folder)
    assert updated.state == str(outcome.state) == str(current_state(folder))
    truth = truth_after(original, changes)
    for strategy, found in answers(updated, STRATEGIES).items():
        assert doc not in found[q], f"{strategy} still returns the revoked document to {user}"
        for row, ids in enumerate(found):
            ids = ids[ids >= 0]
            assert truth.user_mask(updated.query_users[row])[ids].all(), f"{strategy}: forbidden result for query {row}"
    assert files_of(folder) == before, "the workload folder is never written"
    assert load_workload(folder, updates=False).doc_roles.equals(original.doc_roles), "its own grants are kept"


def test_a_granted_document_appears(original, folder):
    q, user, doc = just_out_of_reach(original)
    role = sorted(Rbac.of(original).user_roles_of(user))[0]
    update(folder, [Change("grant", doc=doc, role=role)])
    assert answers(load_workload(folder))["honeybee"][q][0] == doc


def test_a_user_who_leaves_a_role_loses_what_it_alone_granted_and_one_who_leaves_all_sees_nothing(original, folder):
    q, user, doc, role = seen_through_one_role(original)
    changes = [Change("leave", user=user, role=role)]
    update(folder, changes)
    updated = load_workload(folder)
    found = answers(updated)["honeybee"]
    asked = [row for row, u in enumerate(updated.query_users) if u == user]
    lost = Rbac.of(original).user_mask(user) & ~truth_after(original, changes).user_mask(user)
    returned = found[asked][found[asked] >= 0]
    assert doc not in found[q] and not lost[returned].any()

    rest = sorted(Rbac.of(updated).user_roles_of(user))
    update(folder, [Change("leave", user=user, role=r) for r in rest])
    found = answers(load_workload(folder))["honeybee"]
    assert (found[asked] == -1).all(), "a user with no role left gets empty answers"


def test_a_deleted_document_is_gone_everywhere(original, folder):
    q, _, doc, _ = seen_through_one_role(original)
    update(folder, [Change("delete_doc", doc=doc)])
    updated = load_workload(folder)
    assert not (updated.doc_roles.doc_id == doc).any()
    for strategy, found in answers(updated, STRATEGIES).items():
        assert not (found == doc).any(), f"{strategy} returns the deleted document"


def test_an_added_document_is_read_from_the_state(original, folder):
    q, user, _ = just_out_of_reach(original)
    role = sorted(Rbac.of(original).user_roles_of(user))[0]
    new = len(original.vectors)
    update(folder, [Change("add_doc", doc=new, roles=(role,), vector=tuple(map(float, original.queries[q])))])
    updated = load_workload(folder)
    assert len(updated.vectors) == new + 1
    assert answers(updated)["honeybee"][q][0] == new


def test_a_workload_edited_after_an_update_is_refused_until_the_state_is_moved_aside(original, folder):
    q, _, doc, role = seen_through_one_role(original)
    outcome = update(folder, [Change("revoke", doc=doc, role=role)])
    (folder / "user_roles.csv").write_text((folder / "user_roles.csv").read_text() + "newcomer,all-staff\n")
    with pytest.raises(InputError) as err:
        load_workload(folder)
    assert "state.json" in str(err.value) and "workload_fingerprint" in str(err.value)
    assert (outcome.state / "state.json").is_file(), "nothing is deleted"


def test_a_state_kept_elsewhere_is_linked_beside_the_workload_and_a_second_one_is_refused(original, folder, tmp_path):
    q, user, doc, role = seen_through_one_role(original)
    elsewhere = tmp_path / "kept" / "state"
    update(folder, [Change("revoke", doc=doc, role=role)], state=elsewhere)
    assert state_link(folder).is_symlink() and current_state(folder) == elsewhere.resolve()
    assert doc not in answers(load_workload(folder))["honeybee"][q]
    with pytest.raises(InputError) as err:
        update(folder, [Change("grant", doc=doc, role=role)], state=tmp_path / "another")
    assert str(elsewhere.resolve()) in str(err.value)
    update(folder, [Change("grant", doc=doc, role=role)])  # no --state: continues where the state is
    assert doc in answers(load_workload(folder))["honeybee"][q]

    os.rename(elsewhere, tmp_path / "moved")
    with pytest.raises(InputError) as err:
        load_workload(folder)  # never a silent fall-back to the workload's older permissions
    assert "missing" in str(err.value)


# --------------------------------------------------------------------------- the flow's and the deployment's read path


def test_the_workers_partition_server_answers_from_the_update_and_reloads_after_the_next(original, folder):
    from tasks.honeybee.serve import PartitionSpec, SearchJob
    from tasks.honeybee.tasks import server_for

    q, user, doc, role = seen_through_one_role(original)
    held = Rbac.of(original).user_roles_of(user)

    def worker_answer() -> np.ndarray:
        server = server_for(str(folder))
        server.build("per_user", [PartitionSpec(0, tuple(sorted(held)), "flat")])
        _, ids, _ = server.search("per_user", [SearchJob(q, held, 0, 0, True)], K)
        server.drop("per_user")
        return ids[0]

    assert doc in worker_answer()
    update(folder, [Change("revoke", doc=doc, role=role)])
    assert doc not in worker_answer()
    update(folder, [Change("grant", doc=doc, role=role)])
    assert doc in worker_answer()


def test_the_flow_runs_on_the_updated_workload_and_says_which_state_it_read(original, folder, prefect_api, tmp_path):
    import yaml

    from flows.honeybee.flow import honeybee

    q, _, doc, role = seen_through_one_role(original)
    outcome = update(folder, [Change("revoke", doc=doc, role=role), Change("delete_doc", doc=doc + 1)])
    infra = tmp_path / "infra.yaml"
    infra.write_text(yaml.safe_dump({"name": "one", "pools": [
        {"name": "cloud-search", "tier": "cloud", "device": "cpu-large", "count": 1}]}))
    summary = honeybee(workload=str(folder), infra=str(infra), results_dir=str(tmp_path / "results"), run_id="updated")
    details = summary["details"]
    assert details["state"] == str(outcome.state)
    evaluation = json.loads((tmp_path / "results" / "honeybee" / "updated" / "evaluation.json").read_text())
    assert evaluation["workload"]["state"] == str(outcome.state)
    assert str(outcome.state) in (tmp_path / "results" / "honeybee" / "updated" / "report.md").read_text()
    assert details["rejected_at_merge"] == 0 and all(r >= details["recall_target"] for r in details["recall"].values())


# --------------------------------------------------------------------------- the command line, as a user runs it


def tierflow(*args) -> dict:
    result = subprocess.run([TIERFLOW, *map(str, args), "--json"], env=dict(os.environ), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_revoke_then_grant_leave_and_delete_through_the_command_line(original, folder, tmp_path):
    model = tmp_path / "cost_model.json"
    model.write_text(json.dumps(ALL_FLAT.to_dict()))
    revoked_q, _, revoked, role = seen_through_one_role(original)
    granted_q, user, granted = just_out_of_reach(original)
    assert revoked in exact_answers(original, Rbac.of(original))[revoked_q], "before: the user gets it"

    def query() -> tuple[dict[int, list[int]], str | None]:
        document = tierflow("honeybee", "query", "--workload", folder, "--model", model, "--recall", "0.9", "--k", K)
        return {row["query_id"]: row["ids"] for row in document["queries"]}, document["state"]

    first = tmp_path / "revoke.jsonl"
    first.write_text(json.dumps({"op": "revoke", "doc": revoked, "role": role}) + "\n")
    assert tierflow("honeybee", "update", "--workload", folder, "--changes", first, "--model", model,
                    "--recall", "0.9")["forbidden_results"] == 0
    after, state = query()
    assert revoked not in after[revoked_q] and state == str(state_link(folder))

    leaver = next(u for u in original.query_users if u != user)
    second = tmp_path / "more.jsonl"
    second.write_text("\n".join(json.dumps(c) for c in [
        {"op": "grant", "doc": granted, "role": sorted(Rbac.of(original).user_roles_of(user))[0]},
        {"op": "delete_doc", "doc": revoked},
        *({"op": "leave", "user": leaver, "role": r} for r in sorted(Rbac.of(original).user_roles_of(leaver))),
    ]) + "\n")
    tierflow("honeybee", "update", "--workload", folder, "--changes", second)
    after, _ = query()
    assert after[granted_q][0] == granted
    assert all(revoked not in ids for ids in after.values())
    assert all(after[q] == [] for q, u in enumerate(original.query_users) if u == leaver), "left every role: nothing"
