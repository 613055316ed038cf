"""Analytical models of filtered ANN search cost and recall, fitted from measurements.

HoneyBee decides partitions by predicting, for a user whose permitted documents make up
a fraction ``s`` (the *selectivity*) of a partition of ``n`` documents, how long one
filtered top-k search takes once its search effort is set high enough to reach the
recall floor. Two ways to search a partition are modelled (both real faiss searches,
measured on the workers by ``tasks.honeybee.profile``):

- ``hnsw``: graph search with the permission filter as a faiss IDSelector. Recall falls
  as ``s`` falls (the graph walk visits about ``ef`` nodes whatever the filter admits),
  so the effort ``ef`` must grow roughly like ``k / s``. Models, least squares on the
  measured grid::

      logit(recall) = a0 + a1·ln ef + a2·ln s + a3·ln n          (recall model)
      ln latency    = c0 + c1·ln ef + c2·(ln ef)² + c3·ln n      (latency model)

  The effort for a recall floor ρ inverts the recall model:
  ``ln ef = (logit ρ − a0 − a2·ln s − a3·ln n) / a1``, clamped to the measured range;
  a floor that needs more than the largest measured ``ef`` is *unreachable* (no
  extrapolation into effort nobody measured).
- ``flat``: exact scan of the partition's permitted vectors (recall 1). A user who may
  see all of it gets one BLAS scan of the whole partition; otherwise only the
  ``m = n·s`` permitted rows are read, in place — cheap while they fit in cache, dearer
  per row beyond (``m0`` rows, chosen from a ladder by the fit)::

      latency = f0 + f1·n                                  (s = 1)
      latency = f0 + f2·m + f3·max(0, m − m0)              (s < 1)

  (non-negative least squares on relative error: the fixed per-call cost matters as
  much as the per-row one).

An HNSW partition keeps its vectors, so a user who may see little of it can also be
served by an exact scan of just its permitted vectors (same storage, recall 1, cost of
the flat model at that selectivity); :meth:`SearchCostModel.choose` picks the cheaper of
graph walk and scan per (user, partition) unless told to walk the graph only (the
``rls`` baseline). - ``ivf``: inverted lists over ``nlist ≈ 4·√n`` k-means cells (:func:`ivf_cells`), the
  filter as an IDSelector, ``nprobe`` cells scanned::

      logit(recall) = b0 + b1·ln(nprobe/nlist) + b2·ln s + b3·ln n   (nprobe = nlist is exact)
      latency       = d0 + d1·nlist + d2·r + d3·r·s,   r = nprobe·n/nlist rows probed

  (the coarse quantizer compares the query with every centroid; each probed row is
  checked against the filter and, if admitted, compared; non-negative least squares on
  relative error).

A partition gets the kind that is cheapest for a user who may see all
of it (:meth:`SearchCostModel.partition_kind`); :meth:`SearchCostModel.search_cost` is
the function the partitioning optimizer prices a (user, partition) pair with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

KINDS = ("hnsw", "ivf", "flat")
MIN_POINTS_PER_CELL = 39  # faiss' k-means wants at least this many training points per cell


def ivf_cells(n: int) -> int:
    """IVF cells for a partition of ``n`` vectors: about 4·√n, at least 1, at most n // 39."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CELL))
MEASUREMENT_COLUMNS = ["kind", "n", "selectivity", "effort", "k", "recall", "latency_s"]
_RECALL_CLIP = (0.005, 0.995)


def _logit(p: np.ndarray | float) -> np.ndarray | float:
    p = np.clip(p, *_RECALL_CLIP)
    return np.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class SearchChoice:
    """How to search one partition for one user: kind, effort and the predicted outcome."""

    kind: str
    effort: int  # hnsw graph walk: efSearch; exact scans: 0
    latency_s: float
    recall: float
    exact: bool = False  # scan the permitted vectors instead of walking the graph
    # effort: hnsw efSearch, ivf nprobe, 0 for exact scans


@dataclass(frozen=True)
class SearchCostModel:
    """Fitted latency and recall models for filtered top-k search (see the module docstring).

    Parameters
    ----------
    k: results per query the models were measured for.
    recall_floor: the recall@k every search must reach.
    hnsw_recall: (a0, a1, a2, a3) of the recall model.
    hnsw_latency: (c0, c1, c2, c3) of the latency model.
    flat_latency: (f0, f1, f2, f3, m0) of the exact-scan model.
    ef_range: smallest and largest efSearch measured.
    fit: goodness of fit per model (R² and median relative error), for the report.
    ivf_recall: (b0, b1, b2, b3) of the IVF recall model (None: IVF not measured).
    ivf_latency: (d0, d1, d2, d3) of the IVF latency model.
    """

    k: int
    recall_floor: float
    hnsw_recall: tuple[float, float, float, float]
    hnsw_latency: tuple[float, float, float, float]
    flat_latency: tuple[float, float, float, float, float]
    ef_range: tuple[int, int]
    fit: dict = field(default_factory=dict)
    ivf_recall: tuple[float, float, float, float] | None = None
    ivf_latency: tuple[float, float, float, float] | None = None

    # ---- the models -------------------------------------------------------------------
    def recall(self, kind: str, n: int, s: float, effort: int) -> float:
        """Predicted recall@k of one search."""
        if kind == "flat":
            return 1.0
        if kind == "ivf":
            nlist = ivf_cells(n)
            if effort >= nlist:
                return 1.0  # every cell scanned: exact
            b0, b1, b2, b3 = self.ivf_recall
            return _sigmoid(b0 + b1 * math.log(max(effort, 1) / nlist) + b2 * math.log(max(s, 1e-9))
                            + b3 * math.log(max(n, 2)))
        a0, a1, a2, a3 = self.hnsw_recall
        return _sigmoid(a0 + a1 * math.log(max(effort, 1)) + a2 * math.log(max(s, 1e-9)) + a3 * math.log(max(n, 2)))

    def latency(self, kind: str, n: int, s: float, effort: int) -> float:
        """Predicted seconds of one search."""
        if kind == "flat":
            return float(_scan_latency(self.flat_latency, n, np.asarray(s, dtype=float)))
        if kind == "ivf":
            return float(_ivf_latency(self.ivf_latency, n, np.asarray(s, dtype=float), np.asarray(effort, dtype=float)))
        c0, c1, c2, c3 = self.hnsw_latency
        le = math.log(max(effort, 1))
        return math.exp(c0 + c1 * le + c2 * le * le + c3 * math.log(max(n, 2)))

    def hnsw_effort(self, n: int, s: float) -> int | None:
        """Smallest efSearch the recall model says reaches the floor; None when out of range."""
        a0, a1, a2, a3 = self.hnsw_recall
        if a1 <= 0:
            return None
        target = float(_logit(self.recall_floor))
        ln_ef = (target - a0 - a2 * math.log(max(s, 1e-9)) - a3 * math.log(max(n, 2))) / a1
        lo, hi = self.ef_range
        if ln_ef > math.log(hi):
            return None
        return int(min(hi, max(lo, self.k, math.ceil(math.exp(ln_ef)))))

    def ivf_effort(self, n: int, s: float | np.ndarray) -> np.ndarray:
        """Smallest nprobe the recall model says reaches the floor (at most every cell: exact)."""
        b0, b1, b2, b3 = self.ivf_recall
        nlist = ivf_cells(n)
        if b1 <= 0:
            return np.full(np.shape(s), nlist)
        ln_share = (float(_logit(self.recall_floor)) - b0 - b2 * np.log(np.clip(s, 1e-9, 1.0)) - b3 * math.log(max(n, 2))) / b1
        return np.clip(np.ceil(nlist * np.exp(np.minimum(ln_share, 0.0))), 1, nlist).astype(int)

    def choose(self, kind: str, n: int, s: float, *, allow_exact: bool = True) -> SearchChoice | None:
        """How to search one partition of ``kind`` at the recall floor (None: unreachable).

        For hnsw, the cheaper of the graph walk and (when ``allow_exact``) an exact scan of
        the permitted vectors.
        """
        if s <= 0:
            return SearchChoice(kind, 0, 0.0, 1.0, exact=True)  # nothing permitted here: not searched
        scan = SearchChoice(kind, 0, self.latency("flat", n, s, 0), 1.0, exact=True)
        if kind == "flat":
            return scan
        if kind == "ivf":  # its vectors sit in the cells' lists: no in-place scan of a subset
            nprobe = int(self.ivf_effort(n, s))
            return SearchChoice("ivf", nprobe, self.latency("ivf", n, s, nprobe), self.recall("ivf", n, s, nprobe))
        ef = self.hnsw_effort(n, s)
        graph = None if ef is None else SearchChoice("hnsw", ef, self.latency("hnsw", n, s, ef), self.recall("hnsw", n, s, ef))
        if not allow_exact:
            return graph
        return scan if graph is None or scan.latency_s < graph.latency_s else graph

    def partition_kind(self, n: int) -> str:
        """The index kind a partition of ``n`` documents gets: cheaper one at selectivity 1."""
        options = {"flat": self.choose("flat", n, 1.0), "hnsw": self.choose("hnsw", n, 1.0, allow_exact=False)}
        if self.ivf_recall is not None:
            options["ivf"] = self.choose("ivf", n, 1.0)
        return min((c.latency_s, kind) for kind, c in options.items() if c is not None)[1]

    def search_cost(self, n: int, s: np.ndarray) -> np.ndarray:
        """Seconds to search a partition of ``n`` docs at each selectivity in ``s``.

        Vectorised over users (the optimizer prices thousands of pairs at once). The
        partition's kind depends on ``n`` only; in an hnsw partition each user gets the
        cheaper of graph walk and exact scan, so the cost is always finite.
        """
        s = np.clip(np.asarray(s, dtype=float), 1e-9, 1.0)
        scan = _scan_latency(self.flat_latency, n, s)
        kind = self.partition_kind(n)
        if kind == "flat":
            return scan
        if kind == "ivf":
            return _ivf_latency(self.ivf_latency, n, s, self.ivf_effort(n, s))
        a0, a1, a2, a3 = self.hnsw_recall
        c0, c1, c2, c3 = self.hnsw_latency
        lo, hi = self.ef_range
        if a1 <= 0:
            return scan
        ln_ef = (float(_logit(self.recall_floor)) - a0 - a2 * np.log(s) - a3 * math.log(max(n, 2))) / a1
        ef = np.clip(np.ceil(np.exp(np.minimum(ln_ef, 50.0))), max(lo, self.k), hi)
        le = np.log(ef)
        graph = np.exp(c0 + c1 * le + c2 * le * le + c3 * math.log(max(n, 2)))
        return np.minimum(np.where(ln_ef > math.log(hi), np.inf, graph), scan)

    # ---- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchCostModel":
        return cls(
            k=int(data["k"]), recall_floor=float(data["recall_floor"]),
            hnsw_recall=tuple(map(float, data["hnsw_recall"])), hnsw_latency=tuple(map(float, data["hnsw_latency"])),
            flat_latency=tuple(map(float, data["flat_latency"])), ef_range=tuple(map(int, data["ef_range"])),
            fit=dict(data.get("fit", {})),
            ivf_recall=tuple(map(float, data["ivf_recall"])) if data.get("ivf_recall") else None,
            ivf_latency=tuple(map(float, data["ivf_latency"])) if data.get("ivf_latency") else None,
        )

    def with_floor(self, recall_floor: float) -> "SearchCostModel":
        """The same fitted models priced at another recall floor."""
        return SearchCostModel(self.k, recall_floor, self.hnsw_recall, self.hnsw_latency, self.flat_latency,
                               self.ef_range, self.fit, self.ivf_recall, self.ivf_latency)


FULL_SCAN = 0.999  # selectivities at or above this scan the whole partition (no subset)
CACHE_ROW_LADDER = (500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000)


def _scan_latency(f: tuple, n: float, s: np.ndarray) -> np.ndarray:
    """The exact-scan model (module docstring), vectorised over selectivities."""
    f0, f1, f2, f3, m0 = f
    m = n * s
    return np.where(s >= FULL_SCAN, f0 + f1 * n, f0 + f2 * m + f3 * np.maximum(0.0, m - m0))


def _ivf_latency(d: tuple, n: float, s: np.ndarray, nprobe: np.ndarray) -> np.ndarray:
    """The IVF latency model (module docstring), vectorised."""
    d0, d1, d2, d3 = d
    nlist = ivf_cells(int(n))
    rows = np.minimum(nprobe, nlist) * n / nlist
    return d0 + d1 * nlist + d2 * rows + d3 * rows * s


def _ivf_design(n: np.ndarray, s: np.ndarray, nprobe: np.ndarray) -> np.ndarray:
    nlist = np.array([ivf_cells(int(v)) for v in n], dtype=float)
    rows = np.minimum(nprobe, nlist) * n / nlist
    return np.column_stack([np.ones_like(n), nlist, rows, rows * s])


def _scan_design(n: np.ndarray, s: np.ndarray, m0: float) -> np.ndarray:
    full = s >= FULL_SCAN
    m = n * s
    return np.column_stack([np.ones_like(n), np.where(full, n, 0.0), np.where(full, 0.0, m),
                            np.where(full, 0.0, np.maximum(0.0, m - m0))])


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0


def fit_cost_model(measurements: pd.DataFrame, *, recall_floor: float) -> SearchCostModel:
    """Fit the recall and latency models to a measured grid.

    Parameters
    ----------
    measurements: one row per (kind, n, selectivity, effort) with columns
        :data:`MEASUREMENT_COLUMNS`; ``recall`` is recall@k against exact filtered search
        and ``latency_s`` the mean seconds per single-query search.
    recall_floor: recall@k every search must reach (0 < floor < 1).
    """
    if not 0 < recall_floor < 1:
        raise ValueError(f"recall_floor must be in (0, 1), got {recall_floor!r}")
    missing = set(MEASUREMENT_COLUMNS) - set(measurements.columns)
    if missing:
        raise ValueError(f"measurements lack columns {sorted(missing)}")
    ks = measurements["k"].unique()
    if len(ks) != 1:
        raise ValueError(f"measurements mix k values {sorted(ks)}")
    hnsw = measurements[measurements["kind"] == "hnsw"]
    flat = measurements[measurements["kind"] == "flat"]
    if len(hnsw) < 8 or len(flat) < 3:
        raise ValueError(f"too few measurements to fit: {len(hnsw)} hnsw rows (need 8), {len(flat)} flat rows (need 3)")

    ln_ef = np.log(hnsw["effort"].to_numpy(float))
    ln_s = np.log(hnsw["selectivity"].to_numpy(float))
    ln_n = np.log(hnsw["n"].to_numpy(float))
    y_recall = _logit(hnsw["recall"].to_numpy(float))
    x_recall = np.column_stack([np.ones_like(ln_ef), ln_ef, ln_s, ln_n])
    a, *_ = np.linalg.lstsq(x_recall, y_recall, rcond=None)

    y_lat = np.log(hnsw["latency_s"].to_numpy(float))
    x_lat = np.column_stack([np.ones_like(ln_ef), ln_ef, ln_ef ** 2, ln_n])
    c, *_ = np.linalg.lstsq(x_lat, y_lat, rcond=None)

    from scipy.optimize import nnls

    n_f = flat["n"].to_numpy(float)
    s_f = flat["selectivity"].to_numpy(float)
    lat_f = flat["latency_s"].to_numpy(float)
    best = None
    for m0 in CACHE_ROW_LADDER:  # relative errors, so the fixed per-call cost weighs as much as the rows
        design = _scan_design(n_f, s_f, m0)
        coef, residual = nnls(design / lat_f[:, None], np.ones_like(lat_f))
        if best is None or residual < best[0]:
            best = (residual, (*coef, float(m0)))
    f = best[1]

    ivf_recall = ivf_latency = None
    ivf = measurements[measurements["kind"] == "ivf"]
    nlist = np.array([ivf_cells(int(n)) for n in ivf["n"]], dtype=float)
    approximate = ivf[ivf["effort"].to_numpy(float) < nlist]  # nprobe = nlist is exact: nothing to fit
    if len(approximate) >= 8:
        nl = np.array([ivf_cells(int(n)) for n in approximate["n"]], dtype=float)
        x_ivf = np.column_stack([np.ones(len(approximate)), np.log(approximate["effort"].to_numpy(float) / nl),
                                 np.log(approximate["selectivity"].to_numpy(float)), np.log(approximate["n"].to_numpy(float))])
        b, *_ = np.linalg.lstsq(x_ivf, _logit(approximate["recall"].to_numpy(float)), rcond=None)
        x_ivf_lat = _ivf_design(ivf["n"].to_numpy(float), ivf["selectivity"].to_numpy(float), ivf["effort"].to_numpy(float))
        y_ivf_lat = ivf["latency_s"].to_numpy(float)
        d, _ = nnls(x_ivf_lat / y_ivf_lat[:, None], np.ones_like(y_ivf_lat))
        ivf_recall, ivf_latency = tuple(float(v) for v in b), tuple(float(v) for v in d)
    pred_recall = 1 / (1 + np.exp(-(x_recall @ a)))
    pred_lat = np.exp(x_lat @ c)
    pred_flat = _scan_latency(f, n_f, s_f)
    fit = {
        "hnsw_recall_r2_logit": round(_r2(y_recall, x_recall @ a), 4),
        "hnsw_recall_median_abs_error": round(float(np.median(np.abs(pred_recall - hnsw["recall"].to_numpy(float)))), 4),
        "hnsw_latency_r2_log": round(_r2(y_lat, x_lat @ c), 4),
        "hnsw_latency_median_rel_error": round(float(np.median(np.abs(pred_lat / hnsw["latency_s"].to_numpy(float) - 1))), 4),
        "flat_latency_r2": round(_r2(lat_f, pred_flat), 4),
        "flat_latency_median_rel_error": round(float(np.median(np.abs(pred_flat / lat_f - 1))), 4),
        "rows": int(len(measurements)),
    }
    if ivf_recall is not None:
        fit["ivf_recall_r2_logit"] = round(_r2(_logit(approximate["recall"].to_numpy(float)), x_ivf @ np.array(ivf_recall)), 4)
        fit["ivf_latency_r2"] = round(_r2(y_ivf_lat, x_ivf_lat @ np.array(ivf_latency)), 4)
        fit["ivf_latency_median_rel_error"] = round(float(np.median(np.abs(x_ivf_lat @ np.array(ivf_latency) / y_ivf_lat - 1))), 4)
    efs = hnsw["effort"].to_numpy(int)
    return SearchCostModel(
        k=int(ks[0]), recall_floor=float(recall_floor),
        hnsw_recall=tuple(float(v) for v in a), hnsw_latency=tuple(float(v) for v in c),
        flat_latency=tuple(float(v) for v in f), ef_range=(int(efs.min()), int(efs.max())), fit=fit,
        ivf_recall=ivf_recall, ivf_latency=ivf_latency,
    )
