"""Changes to a HoneyBee workload: grants, revocations, users joining and leaving roles,
documents added and deleted — read from a JSON-lines file and applied to the tables.

One change per line::

    {"op": "grant",      "doc": 12, "role": "eng"}
    {"op": "revoke",     "doc": 12, "role": "eng"}
    {"op": "join",       "user": "ana", "role": "eng"}       # a new user may join
    {"op": "leave",      "user": "ana", "role": "eng"}
    {"op": "add_doc",    "doc": 20000, "roles": ["eng"], "vector": [0.1, ...]}   # ids continue 0..N-1
    {"op": "delete_doc", "doc": 12}

A deleted document keeps its row (ids are rows) but loses every grant, so no one sees it.
Every change is checked against the tables as they are when it applies; the first bad
one raises :class:`InputError` naming the file, the line, the field and the value, and
nothing is applied.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from infra.errors import InputError

OPS = {"grant": ("doc", "role"), "revoke": ("doc", "role"), "join": ("user", "role"), "leave": ("user", "role"),
       "add_doc": ("doc", "roles", "vector"), "delete_doc": ("doc",)}


@dataclass(frozen=True)
class Change:
    """One change; ``where`` is its origin for messages (``file:line``)."""

    op: str
    doc: int | None = None
    role: str | None = None
    user: str | None = None
    roles: tuple[str, ...] = ()
    vector: tuple[float, ...] = ()
    where: str = "changes"


def read_changes(path: str | Path) -> list[Change]:
    """Parse a JSON-lines changes file (shape only; :func:`apply_changes` checks them against the tables)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"cannot read: {exc}") from None
    changes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(where, "<line>", line[:80], f"not JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise InputError(where, "<line>", line[:80], "each line must be a JSON object")
        changes.append(parse_change(item, where))
    return changes


def parse_change(item: dict, where: str) -> Change:
    """One change from its JSON object, with its fields' types checked."""
    op = item.get("op")
    if op not in OPS:
        raise InputError(where, "op", op, f"must be one of {', '.join(OPS)}")
    extra = sorted(set(item) - {"op", *OPS[op]})
    if extra:
        raise InputError(where, extra[0], item[extra[0]], f"unknown field for {op!r} (it takes {', '.join(OPS[op])})")
    for name in OPS[op]:
        if name not in item:
            raise InputError(where, name, None, f"missing: {op!r} needs {', '.join(OPS[op])}")
    doc = item.get("doc")
    if "doc" in OPS[op] and (not isinstance(doc, int) or isinstance(doc, bool) or doc < 0):
        raise InputError(where, "doc", doc, "must be a document id (an integer ≥ 0)")
    for name in ("role", "user"):
        if name in OPS[op] and (not isinstance(item[name], str) or not item[name]):
            raise InputError(where, name, item[name], "must be a non-empty string")
    roles, vector = (), ()
    if op == "add_doc":
        roles = item["roles"]
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r for r in roles):
            raise InputError(where, "roles", roles, "must be a non-empty list of role names (a document needs a role)")
        vector = item["vector"]
        if not isinstance(vector, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
            raise InputError(where, "vector", str(vector)[:60], "must be a list of numbers")
        if not np.isfinite(np.asarray(vector, dtype=float)).all():
            raise InputError(where, "vector", str(vector)[:60], "holds NaN or infinity")
    return Change(op, doc=doc, role=item.get("role"), user=item.get("user"), roles=tuple(roles),
                  vector=tuple(float(v) for v in vector), where=where)


@dataclass
class Tables:
    """The permission tables and vectors as changes leave them."""

    vectors: np.ndarray
    doc_roles: pd.DataFrame
    user_roles: pd.DataFrame
    deleted: set[int] = field(default_factory=set)


def apply_changes(tables: Tables, changes: list[Change]) -> Tables:
    """The tables after ``changes``, in order; the input is not modified.

    Raises InputError (naming the change's file:line) for a change that does not fit the
    tables as they are when it applies: an unknown document, a grant that exists or a
    revocation that does not, a role no document is granted to (for ``join``), a user
    leaving a role they do not hold, an ``add_doc`` whose id is not the next one or whose
    vector has the wrong dimension, a deleted document touched again.
    """
    doc_roles: dict[int, set[str]] = {}
    for doc, role in zip(tables.doc_roles["doc_id"].astype(int), tables.doc_roles["role"]):
        doc_roles.setdefault(int(doc), set()).add(role)
    granted = Counter(tables.doc_roles["role"])  # role → documents granted to it
    held = set(zip(tables.user_roles["user"], tables.user_roles["role"]))
    deleted = set(tables.deleted)
    n_docs, dim = tables.vectors.shape
    added: list[np.ndarray] = []
    for c in changes:
        if c.op in ("grant", "revoke", "delete_doc"):
            if not 0 <= c.doc < n_docs or c.doc in deleted:
                state = "deleted" if c.doc in deleted else f"not a document (ids are 0..{n_docs - 1})"
                raise InputError(c.where, "doc", c.doc, state)
        roles = doc_roles.setdefault(c.doc, set()) if c.doc is not None else set()
        if c.op == "grant":
            if c.role in roles:
                raise InputError(c.where, "role", c.role, f"document {c.doc} already has this role")
            roles.add(c.role)
            granted[c.role] += 1
        elif c.op == "revoke":
            if c.role not in roles:
                raise InputError(c.where, "role", c.role, f"document {c.doc} does not have this role")
            roles.discard(c.role)
            granted[c.role] -= 1
        elif c.op == "join":
            if granted[c.role] <= 0:
                raise InputError(c.where, "role", c.role, "unknown role: no document is granted to it")
            if (c.user, c.role) in held:
                raise InputError(c.where, "role", c.role, f"user {c.user!r} already holds this role")
            held.add((c.user, c.role))
        elif c.op == "leave":
            if (c.user, c.role) not in held:
                raise InputError(c.where, "role", c.role, f"user {c.user!r} does not hold this role")
            held.discard((c.user, c.role))
        elif c.op == "add_doc":
            if c.doc != n_docs:
                raise InputError(c.where, "doc", c.doc, f"new documents take the next id, {n_docs}")
            if len(c.vector) != dim:
                raise InputError(c.where, "vector", f"{len(c.vector)} numbers", f"must have the corpus' dimension, {dim}")
            added.append(np.asarray(c.vector, dtype=np.float32))
            roles.update(c.roles)
            granted.update(set(c.roles))
            n_docs += 1
        elif c.op == "delete_doc":
            granted.subtract(roles)
            roles.clear()
            deleted.add(c.doc)
    grants = sorted((doc, role) for doc, roles in doc_roles.items() for role in roles)
    vectors = np.vstack([tables.vectors, *added]) if added else tables.vectors
    doc_roles = pd.DataFrame(grants, columns=["doc_id", "role"]).astype({"doc_id": np.int64})
    user_roles = pd.DataFrame(sorted(held), columns=["user", "role"])
    return Tables(np.ascontiguousarray(vectors, dtype=np.float32), doc_roles, user_roles, deleted)
