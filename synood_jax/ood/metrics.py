"""OOD detection metrics (numpy, float64): AUROC, FPR at a TPR, AUPR-In/Out, ROC points.

Scores are higher = more in-distribution. Two conventions:
- 'id_positive' (MOS, MCM, NegLabel): ID is the positive class with score s;
  FPR95 = share of OOD accepted (s >= t) at the first threshold t that accepts >= 95% of ID.
- 'ood_positive' (OpenOOD v1.5): OOD is the positive class with score -s;
  FPR95 = share of ID rejected (-s >= t) at the first threshold t that catches >= 95% of OOD.
The curve is the full ROC at distinct thresholds (ties handled as sklearn does: one operating point
per distinct score), with (0, 0) prepended; FPR at TPR x = FPR of the first point with TPR >= x,
no interpolation (= sklearn `fpr[np.argmax(tpr >= x)]` with `drop_intermediate=False`).
NegLabel's own evaluation instead takes the point whose recall is nearest to 0.95.
AUROC is the same under both conventions; AUPR-In and AUPR-Out are sklearn's average precision
(sum_k (R_k - R_{k-1}) P_k) with ID positive on s, and OOD positive on -s, in both conventions.
"""
from __future__ import annotations

import numpy as np

CONVENTIONS = ("id_positive", "ood_positive")


def _as_scores(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError(f"metrics: {name} is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"metrics: {name} has non-finite values")
  return x


def _binary_curve(pos: np.ndarray, neg: np.ndarray):
  """(tps, fps, thresholds) at each distinct score, descending: tps_k = #{pos >= t_k}, fps_k = #{neg >= t_k}."""
  scores = np.concatenate([pos, neg])
  labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
  order = np.argsort(scores, kind="mergesort")[::-1]
  scores, labels = scores[order], labels[order]
  last_of_run = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
  tps = np.cumsum(labels)[last_of_run]
  fps = (last_of_run + 1) - tps
  return tps, fps, scores[last_of_run]


def _split(id_scores, ood_scores, convention: str):
  """(positive scores, negative scores) for the convention; OOD-positive negates the scores."""
  s_id, s_ood = _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")
  if convention == "id_positive":
    return s_id, s_ood
  if convention == "ood_positive":
    return -s_ood, -s_id
  raise ValueError(f"metrics: convention={convention!r} not in {CONVENTIONS}")


def roc_points(id_scores, ood_scores, convention: str = "id_positive"):
  """(fpr, tpr, thresholds): TPR_k = tps_k / P, FPR_k = fps_k / N, with (0, 0, +inf) prepended."""
  pos, neg = _split(id_scores, ood_scores, convention)
  tps, fps, thr = _binary_curve(pos, neg)
  return np.r_[0.0, fps / neg.size], np.r_[0.0, tps / pos.size], np.r_[np.inf, thr]


def auroc(id_scores, ood_scores) -> float:
  """AUROC = trapezoid area under the ROC (= P(s_id > s_ood) + 0.5 P(s_id = s_ood))."""
  fpr, tpr, _ = roc_points(id_scores, ood_scores)
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, convention: str = "id_positive") -> float:
  """FPR at the first ROC point with TPR >= tpr (no interpolation)."""
  fprs, tprs, _ = roc_points(id_scores, ood_scores, convention)
  return float(fprs[np.argmax(tprs >= tpr)])


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
  # AP = sum_k (R_k - R_{k-1}) P_k, R_k = tps_k / P, P_k = tps_k / (tps_k + fps_k), R_0 = 0
  tps, fps, _ = _binary_curve(pos, neg)
  recall_steps = np.diff(np.r_[0.0, tps]) / pos.size
  return float(np.sum(recall_steps * tps / (tps + fps)))


def aupr_in(id_scores, ood_scores) -> float:
  """Average precision with ID positive on s."""
  return _average_precision(*_split(id_scores, ood_scores, "id_positive"))


def aupr_out(id_scores, ood_scores) -> float:
  """Average precision with OOD positive on -s."""
  return _average_precision(*_split(id_scores, ood_scores, "ood_positive"))


def ood_metrics(id_scores, ood_scores, convention: str = "id_positive", tpr: float = 0.95) -> dict:
  """dict(fpr95, auroc, aupr_in, aupr_out); only fpr95 depends on the convention."""
  return dict(fpr95=fpr_at_tpr(id_scores, ood_scores, tpr, convention),
              auroc=auroc(id_scores, ood_scores),
              aupr_in=aupr_in(id_scores, ood_scores),
              aupr_out=aupr_out(id_scores, ood_scores))
