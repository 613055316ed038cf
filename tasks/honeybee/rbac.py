"""Who may see what: the permission ground truth every HoneyBee strategy is checked against.

A document is visible to a user when at least one of the user's roles grants it. The grants
are held as a sparse doc×role matrix (CSR for a doc's roles, CSC for a role's docs), so
a permitted mask costs the size of the roles' posting lists, not of the corpus.

Two groupings matter to partitioning strategies:

- role-signature blocks (:meth:`Rbac.blocks`): documents grouped by their exact role set.
  Any partition that respects permissions is a union of whole blocks;
- user classes (:meth:`Rbac.user_classes`): users grouped by their exact role set. Users of
  one class see the same documents, so a per-user index is really a per-class index.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd
from scipy import sparse

from infra.errors import InputError

if TYPE_CHECKING:
    from tasks.honeybee.workload import Workload

MASK_CACHE_BYTES = 256 << 20  # permitted masks kept per Rbac (at least 16 masks)


class Rbac:
    """Who may see what: the permission ground truth every strategy is checked against.

    Parameters
    ----------
    n_docs: the number of documents; doc ids are 0..n_docs-1.
    doc_roles: columns doc_id, role (the grants; a repeated pair counts once).
    user_roles: columns user, role.
    users: further users who hold no role (e.g. one who left every role): they see nothing.
    """

    def __init__(self, n_docs: int, doc_roles: pd.DataFrame, user_roles: pd.DataFrame, users: Iterable[str] = ()):
        self.n_docs = int(n_docs)
        doc_ids = doc_roles["doc_id"].to_numpy(dtype=np.int64)
        if len(doc_ids) and (doc_ids.min() < 0 or doc_ids.max() >= self.n_docs):
            bad = doc_ids[(doc_ids < 0) | (doc_ids >= self.n_docs)][0]
            raise InputError("doc_roles", "doc_id", int(bad), f"outside 0..{self.n_docs - 1}")
        self.roles: list[str] = sorted(set(doc_roles["role"].unique()) | set(user_roles["role"].unique()))
        self.users: list[str] = sorted(set(user_roles["user"].unique()) | set(users))
        self._role_code = {role: code for code, role in enumerate(self.roles)}

        # Codes follow the sorted role names, so a doc's row lists its roles in name order.
        role_codes = pd.Categorical(doc_roles["role"], categories=self.roles).codes.astype(np.int64)
        pairs = np.unique(doc_ids * len(self.roles) + role_codes)
        rows, columns = np.divmod(pairs, len(self.roles))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.n_docs))])
        self._doc_by_role = sparse.csr_matrix((np.ones(len(pairs), dtype=bool), columns, indptr),
                                              shape=(self.n_docs, len(self.roles)))
        self._role_by_doc = self._doc_by_role.tocsc()
        self._role_by_doc.sort_indices()

        grouped = user_roles.groupby("user", sort=True)["role"]
        self._user_roles = {user: frozenset() for user in self.users}
        self._user_roles.update({user: frozenset(roles) for user, roles in grouped})
        self._masks: OrderedDict[frozenset[str], np.ndarray] = OrderedDict()
        self._max_masks = max(16, MASK_CACHE_BYTES // max(self.n_docs, 1))
        self._blocks: list[tuple[frozenset[str], np.ndarray]] | None = None

    @classmethod
    def of(cls, workload: "Workload") -> "Rbac":
        """The workload's permissions; a query user who holds no role (left them all) sees nothing."""
        return cls(len(workload.vectors), workload.doc_roles, workload.user_roles, workload.query_users)

    def doc_role_sets(self) -> list[frozenset[str]]:
        """Each doc's roles (index = doc id); docs of one block share one frozenset."""
        sets = np.empty(self.n_docs, dtype=object)
        for signature, docs in self.blocks():
            sets[docs] = signature
        return list(sets)

    def role_docs(self, role: str) -> np.ndarray:
        """The docs ``role`` grants, as sorted int64 ids (none for a role that grants nothing)."""
        code = self._role_code.get(role)
        if code is None:
            return np.empty(0, dtype=np.int64)
        start, stop = self._role_by_doc.indptr[code], self._role_by_doc.indptr[code + 1]
        return self._role_by_doc.indices[start:stop].astype(np.int64)

    def user_roles_of(self, user: str) -> frozenset[str]:
        try:
            return self._user_roles[user]
        except KeyError:
            raise InputError("query", "user", user, "unknown user: not in user_roles") from None

    def permitted_mask(self, roles: Iterable[str]) -> np.ndarray:
        """(N,) read-only bool: the docs granted to any of ``roles``; cached per role set."""
        key = frozenset(roles)
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        mask = np.zeros(self.n_docs, dtype=bool)
        for role in key:
            mask[self.role_docs(role)] = True
        mask.flags.writeable = False  # shared through the cache
        self._masks[key] = mask
        if len(self._masks) > self._max_masks:
            self._masks.popitem(last=False)
        return mask

    def user_mask(self, user: str) -> np.ndarray:
        return self.permitted_mask(self.user_roles_of(user))

    def permitted_counts(self, role_sets: list[frozenset[str]]) -> np.ndarray:
        """(len(role_sets),) int64: how many docs each role set may see, without building masks.

        A role set sees a block when it holds one of the block's roles, so the counts are
        (role sets × roles) · (roles × blocks) > 0, weighted by block sizes.
        """
        blocks = self.blocks()
        sizes = np.array([len(docs) for _, docs in blocks], dtype=np.int64)
        block_roles = np.zeros((len(self.roles), len(blocks)), dtype=np.float32)
        for b, (signature, _) in enumerate(blocks):
            block_roles[[self._role_code[r] for r in signature], b] = 1
        counts = np.empty(len(role_sets), dtype=np.int64)
        step = 1024  # role sets per product: bounds memory at step × blocks
        for start in range(0, len(role_sets), step):
            held = np.zeros((min(step, len(role_sets) - start), len(self.roles)), dtype=np.float32)
            for i, roles in enumerate(role_sets[start:start + step]):
                held[i, [self._role_code[r] for r in roles if r in self._role_code]] = 1
            counts[start:start + len(held)] = ((held @ block_roles) > 0) @ sizes
        return counts

    def blocks(self) -> list[tuple[frozenset[str], np.ndarray]]:
        """Docs grouped by their exact role set: (signature, sorted int64 doc ids), by sorted signature.

        The blocks partition 0..N-1; a doc with no role forms the block of the empty signature.
        """
        if self._blocks is None:
            self._blocks = self._group_docs_by_role_set()
        return self._blocks

    def _group_docs_by_role_set(self) -> list[tuple[frozenset[str], np.ndarray]]:
        indptr, indices = self._doc_by_role.indptr, self._doc_by_role.indices
        role_counts = np.diff(indptr)
        found = []
        for k in np.unique(role_counts):
            docs = np.flatnonzero(role_counts == k)
            rows = indices[indptr[docs][:, None] + np.arange(k)]  # each doc's k role codes, sorted
            unique_rows, which = np.unique(rows, axis=0, return_inverse=True)
            which = which.ravel()
            order = np.argsort(which, kind="stable")  # docs stay sorted within a block
            bounds = np.concatenate([[0], np.cumsum(np.bincount(which, minlength=len(unique_rows)))])
            for b, codes in enumerate(unique_rows):
                names = tuple(self.roles[c] for c in codes)
                found.append((names, docs[order[bounds[b]:bounds[b + 1]]].astype(np.int64)))
        found.sort(key=lambda block: block[0])
        return [(frozenset(names), docs) for names, docs in found]

    def user_classes(self) -> dict[frozenset[str], list[str]]:
        """Distinct user role sets → the users holding exactly that set (sorted), by sorted role set."""
        classes: dict[frozenset[str], list[str]] = {}
        for user in self.users:
            classes.setdefault(self._user_roles[user], []).append(user)
        return dict(sorted(classes.items(), key=lambda item: sorted(item[0])))
