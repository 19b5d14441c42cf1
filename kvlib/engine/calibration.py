"""`Calibration`: the guard's predictor of KL to full per rung, with a risk-controlled bound.

Design facts:
- Per rung of the ladder (every rung but full, whose KL is 0 by definition), a ridge
  regression predicts y = log(KL + EPS) from standardised request features. The ridge
  strength is chosen per rung by exact leave-one-out error on the fitting part.
- The bound is conformal risk control (Angelopoulos et al., 2022) of the guard's own
  decision, per budget B. A rung is admissible at slack lam when exp(yhat + lam sigma) < B;
  the guard takes the first admissible rung, else full. On a calibration part the fit never
  saw, request i's loss at lam is 1 if the rung the guard would serve at some slack lam' >= lam
  has KL > B: the least upper bound of the served rung's loss that is non-increasing in lam, as
  risk control needs. (Rung r is served at some lam' >= lam exactly when it is admissible at lam
  and outlasts every cheaper rung, t_r > max_{s<r} t_s with t_r the slack at which it stops being
  admissible. Until session 18 the loss counted any admissible rung with KL > B, a looser bound;
  on the 60 dev rows the difference is small, docs/guard.md.)
  lam(B) is the least lam with (sum of losses + 1) / (n + 1) <= 1 - confidence. For a new
  request exchangeable with those, P(KL of the answer served > B) <= 1 - confidence.
- This controls only what matters at B: a rung whose KL is far below B, or whose bound is
  far above it, never makes the guard climb. The earlier simultaneous bound (every rung
  covered at once, format 1) was valid too but fell back to full for almost every request.
- lam is never below 0 (a bound is never under the point prediction; raising lam only
  lowers the loss, so the guarantee keeps). B <= 0 admits no rung: B = 0 is full.
- Too few calibration requests for the asked confidence (n + 1 < 1 / (1 - confidence),
  e.g. fewer than 9 at 0.9) leave lam infinite: the guard always falls back to full. It
  never pretends to a bound it cannot state.
- A feature the request lacks (NaN: no drift score) is imputed with the fitting part's mean.
- Pure numpy; serialised as JSON into the library (store/calibrations.py), with the
  calibration part's predictions and measured KL, so lam is computed for any B on demand.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from kvlib.errors import KvlibError

FORMAT = 2
EPS = 1e-4  # KL floor in log space: below it a rung is as good as full for the predictor
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
METHOD = "ridge on log KL per rung + conformal risk control of the guard's choice, per budget"


@dataclass(frozen=True)
class RungModel:
    name: str  # the rung's repair ("" for plain rerope)
    weights: tuple  # per standardised feature
    intercept: float
    sigma: float  # leave-one-out residual scale: the unit of the bound's slack for this rung
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
    cal_yhat: tuple  # per calibration request, yhat per rung (log KL + EPS predicted)
    cal_kl: tuple  # per calibration request, measured KL to full per rung
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

    def slack(self, budget: float) -> float:
        """lam(B): the least slack whose risk on the calibration part, made conservative by
        conformal risk control, is <= 1 - confidence (module docstring); inf when none is."""
        alpha, n = 1.0 - self.confidence, len(self.cal_kl)
        k = math.floor((n + 1) * alpha - 1 + 1e-9)  # most calibration losses allowed at lam
        if budget <= 0 or k < 0:
            return math.inf
        t = (math.log(budget) - np.array(self.cal_yhat, dtype=float)) / np.array([r.sigma for r in self.rungs])
        # rung r is admissible while lam < t_r, and served at some slack >= lam only if t_r exceeds every
        # cheaper rung's t (it outlasts them); request i loses while such a rung with KL > B is admissible
        below = np.concatenate([np.full((t.shape[0], 1), -np.inf), np.maximum.accumulate(t, axis=1)[:, :-1]], axis=1)
        bad = (np.array(self.cal_kl, dtype=float) > budget) & (t > below)
        losing = np.where(bad, t, -np.inf).max(axis=1)
        ranked = np.sort(losing)[::-1]
        return max(float(ranked[k]) if k < n else -math.inf, 0.0)

    def predict(self, features: dict, budget: float) -> tuple[list[float], list[float]]:
        """(point KL, upper bound at slack lam(budget)) per rung below full."""
        yhat = self.log_predictions(features)
        point = [max(0.0, math.exp(y) - EPS) for y in yhat]
        lam = self.slack(budget)
        if math.isinf(lam):
            return point, [math.inf] * len(yhat)
        return point, [math.exp(y + lam * r.sigma) for y, r in zip(yhat, self.rungs)]

    def choose(self, features: dict, budget: float) -> tuple[int, float, float]:
        """(rung index, its point KL, its bound) of the first rung whose bound is < budget;
        index len(rungs) (full: KL 0) when none is."""
        point, bound = self.predict(features, budget)
        for i, b in enumerate(bound):
            if b < budget:
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
        rows = {k: tuple(map(tuple, obj[k])) for k in ("cal_yhat", "cal_kl")}
        return cls(**{**obj, **rows, "rungs": rungs, "features": tuple(obj["features"]),
                      "center": tuple(obj["center"]), "scale": tuple(obj["scale"])})


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
    return Calibration(model_fp=model_fp, model_name=model_name, encoding=encoding, features=tuple(features),
                       center=tuple(map(float, center)), scale=tuple(map(float, scale)), rungs=tuple(models),
                       confidence=float(confidence), cal_yhat=tuple(tuple(map(float, r)) for r in yhat),
                       cal_kl=tuple(tuple(map(float, r)) for r in kl[cal]), n_fit=int(len(fit)), n_cal=int(len(cal)))


def evaluate(calib: Calibration, x: np.ndarray, kl: np.ndarray, budgets=(), ttft: np.ndarray | None = None) -> dict:
    """The guard simulated at each budget on requests the calibration never saw.

    x: [N, F]; kl: [N, R] per rung below full; ttft: [N, R + 1] seconds per rung and full, if known.
    Per budget: the slack lam(B), the share whose served KL is <= B (what the bound promises at
    `confidence`), the share served without full, the rungs taken, and mean TTFT against full's.
    """
    n = len(x)
    rows = [dict(zip(calib.features, map(float, row))) for row in x]
    out = {"n": n, "confidence": calib.confidence, "budgets": {}}
    for budget in budgets:
        picks = [calib.choose(r, budget)[0] for r in rows]
        chosen_kl = [kl[i, p] if p < len(calib.rungs) else 0.0 for i, p in enumerate(picks)]
        lam = calib.slack(budget)
        names = [r.name or "rerope" for r in calib.rungs] + ["full"]
        row = {"slack": None if math.isinf(lam) else lam,
               "within_budget": float(np.mean([k <= budget for k in chosen_kl])) if n else None,
               "without_full": float(np.mean([p < len(calib.rungs) for p in picks])) if n else None,
               "rungs": {names[i]: count for i, count in sorted(Counter(picks).items())}}
        if ttft is not None and n:
            row["mean_ttft_vs_full"] = float(np.mean([ttft[i, p] for i, p in enumerate(picks)]) / ttft[:, -1].mean())
        out["budgets"][format(budget, "g")] = row
    return out
