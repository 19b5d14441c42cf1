"""`Calibration`: the guard's predictor of KL to full per rung, with a conformal upper bound.

Design facts:
- Per rung of the ladder (every rung but full, whose KL is 0 by definition), a ridge
  regression predicts y = log(KL + EPS) from standardised request features. The ridge
  strength is chosen per rung by exact leave-one-out error on the fitting part.
- Split conformal calibration, made simultaneous over the rungs: on a calibration part
  the fit never saw, each request's score is the largest standardised residual over the
  rungs, max_r (y_r - yhat_r) / sigma_r; q is the ceil((n+1) c)-th smallest score. For a
  new request exchangeable with those, P(every rung's KL <= its bound) >= c, so whichever
  rung the guard picks (the first whose bound is <= B), P(KL <= B) >= c. A per-rung
  quantile would only cover each rung on its own, and the pick would select on its errors.
- Every bound is > 0 (KL + EPS <= exp(yhat + q sigma)), so B = 0 always falls back to full.
- Too few calibration requests for the asked confidence (ceil((n+1) c) > n) leave q
  infinite: every bound is infinite and the guard always falls back to full. It never
  pretends to a bound it cannot state.
- A feature the request lacks (NaN: no drift score) is imputed with the fitting part's mean.
- Pure numpy; serialised as JSON into the library (store/calibrations.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from kvlib.errors import KvlibError

FORMAT = 1
EPS = 1e-4  # KL floor in log space: below it a rung is as good as full for the predictor
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
METHOD = "ridge on log KL per rung + split conformal (max standardised residual over rungs)"


@dataclass(frozen=True)
class RungModel:
    name: str  # the rung's repair ("" for plain rerope)
    weights: tuple  # per standardised feature
    intercept: float
    sigma: float  # leave-one-out residual scale: the conformal score's unit for this rung
    ridge: float


@dataclass(frozen=True)
class Calibration:
    model_fp: str
    model_name: str
    encoding: str
    features: tuple  # feature names, in the order of center/scale/weights
    center: tuple
    scale: tuple
    rungs: tuple  # RungModel per rung below full, cheapest first
    confidence: float
    quantile: float | None  # conformal q; None = infinite (too few calibration requests)
    n_fit: int
    n_cal: int
    report: dict = field(default_factory=dict)  # coverage on the held-back part, data, date

    def log_predictions(self, features: dict) -> np.ndarray:
        """yhat per rung [R] for one request's features (a dict by name)."""
        z = self.standardise(np.array([[features.get(name, math.nan) for name in self.features]], dtype=float))
        return np.array([float(z[0] @ np.array(r.weights)) + r.intercept for r in self.rungs])

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """[N, F] raw features -> standardised, a missing value at the fitting mean (0)."""
        z = (x - np.array(self.center)) / np.array(self.scale)
        return np.where(np.isnan(z), 0.0, z)

    def predict(self, features: dict) -> tuple[list[float], list[float]]:
        """(point KL, upper bound at `confidence`) per rung below full."""
        yhat = self.log_predictions(features)
        point = [max(0.0, math.exp(y) - EPS) for y in yhat]
        if self.quantile is None:
            return point, [math.inf] * len(yhat)
        # KL + EPS <= exp(yhat + q sigma), so exp(yhat + q sigma) bounds KL too, and is > 0: only full meets B = 0
        bound = [math.exp(y + self.quantile * r.sigma) for y, r in zip(yhat, self.rungs)]
        return point, bound

    def choose(self, features: dict, budget: float) -> tuple[int, float, float]:
        """(rung index, its point KL, its bound) of the first rung whose bound is <= budget;
        index len(rungs) (full: KL 0) when none is."""
        point, bound = self.predict(features)
        for i, b in enumerate(bound):
            if b <= budget:
                return i, point[i], b
        return len(self.rungs), 0.0, 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["format"] = FORMAT
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> "Calibration":
        if obj.get("format") != FORMAT:
            raise KvlibError(f"calibration format {obj.get('format')!r} is not {FORMAT}: run `kvlib calibrate` again")
        obj = {k: v for k, v in obj.items() if k != "format"}
        rungs = tuple(RungModel(**{**r, "weights": tuple(r["weights"])}) for r in obj.pop("rungs"))
        return cls(**{**obj, "rungs": rungs, "features": tuple(obj["features"]), "center": tuple(obj["center"]),
                      "scale": tuple(obj["scale"])})


def log_kl(kl) -> np.ndarray:
    return np.log(np.asarray(kl, dtype=float) + EPS)


def fit_ridge(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """Ridge on standardised z [N, F] (intercept unpenalised): (weights, intercept, LOO RMS, ridge).

    The ridge is the grid value with the least exact leave-one-out error: for a linear
    smoother with hat matrix H, the LOO residual of point i is r_i / (1 - H_ii).
    """
    n, f = z.shape
    zc, yc = z - z.mean(0), y - y.mean()
    best = None
    for lam in RIDGE_GRID:
        inv = np.linalg.inv(zc.T @ zc + lam * np.eye(f))
        w = inv @ zc.T @ yc
        hat = np.einsum("ij,jk,ik->i", zc, inv, zc) + 1.0 / n  # + the intercept's share
        loo = (yc - zc @ w) / np.clip(1.0 - hat, 1e-6, None)
        rms = float(np.sqrt(np.mean(loo**2)))
        if best is None or rms < best[2]:
            best = (w, float(y.mean() - z.mean(0) @ w), rms, lam)
    return best


def conformal_quantile(scores: np.ndarray, confidence: float) -> float | None:
    """The ceil((n+1) c)-th smallest score, or None (infinite) when n is too small for c."""
    n = len(scores)
    k = math.ceil((n + 1) * confidence)
    return None if k > n else float(np.sort(scores)[k - 1])


def column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column over its known (non-NaN) values; a column
    with none gets mean 0, and one that does not vary gets scale 1."""
    known = ~np.isnan(x)
    count = known.sum(0)
    filled = np.where(known, x, 0.0)
    center = filled.sum(0) / np.maximum(count, 1)
    var = (np.where(known, x - center, 0.0) ** 2).sum(0) / np.maximum(count, 1)
    scale = np.sqrt(var)
    return center, np.where(scale < 1e-12, 1.0, scale)


def fit_calibration(x: np.ndarray, kl: np.ndarray, fit: np.ndarray, cal: np.ndarray, *, features, rungs,
                    confidence: float, model_fp: str, model_name: str, encoding: str) -> Calibration:
    """x: [N, F] raw features; kl: [N, R] measured KL to full per rung; fit, cal: disjoint row indices."""
    if len(fit) < 3 or len(cal) < 1:
        raise KvlibError(f"too few requests to calibrate: {len(fit)} to fit and {len(cal)} to calibrate "
                         "(need at least 3 and 1); use more data or a smaller --holdout")
    center, scale = column_moments(x[fit])
    z = np.where(np.isnan((x - center) / scale), 0.0, (x - center) / scale)
    y = log_kl(kl)
    models = []
    for r, name in enumerate(rungs):
        w, b, rms, lam = fit_ridge(z[fit], y[fit, r])
        models.append(RungModel(name=name, weights=tuple(map(float, w)), intercept=b, sigma=max(rms, 1e-3),
                                ridge=lam))
    yhat = np.stack([z[cal] @ np.array(m.weights) + m.intercept for m in models], axis=1)
    sigma = np.array([m.sigma for m in models])
    scores = ((y[cal] - yhat) / sigma).max(axis=1)
    return Calibration(model_fp=model_fp, model_name=model_name, encoding=encoding, features=tuple(features),
                       center=tuple(map(float, center)), scale=tuple(map(float, scale)), rungs=tuple(models),
                       confidence=float(confidence), quantile=conformal_quantile(scores, confidence),
                       n_fit=int(len(fit)), n_cal=int(len(cal)))


def evaluate(calib: Calibration, x: np.ndarray, kl: np.ndarray, budgets=(), ttft: np.ndarray | None = None) -> dict:
    """Coverage of the stored bounds on requests it never saw, and the guard simulated at each budget.

    x: [N, F]; kl: [N, R] per rung below full; ttft: [N, R + 1] seconds per rung and full, if known.
    """
    n = len(x)
    rows = [dict(zip(calib.features, map(float, row))) for row in x]
    bounds = np.array([calib.predict(r)[1] for r in rows]) if n else np.zeros((0, len(calib.rungs)))
    within = kl <= bounds
    out = {"n": n, "all_rungs_within_bound": float(within.all(axis=1).mean()) if n else None,
           "per_rung_within_bound": {r.name or "rerope": float(within[:, i].mean()) if n else None
                                     for i, r in enumerate(calib.rungs)}, "budgets": {}}
    for budget in budgets:
        picks = [calib.choose(r, budget)[0] for r in rows]
        chosen_kl = [kl[i, p] if p < len(calib.rungs) else 0.0 for i, p in enumerate(picks)]
        row = {"within_budget": float(np.mean([k <= budget for k in chosen_kl])) if n else None,
               "without_full": float(np.mean([p < len(calib.rungs) for p in picks])) if n else None}
        if ttft is not None and n:
            row["mean_ttft_vs_full"] = float(np.mean([ttft[i, p] for i, p in enumerate(picks)]) / ttft[:, -1].mean())
        out["budgets"][format(budget, "g")] = row
    return out
