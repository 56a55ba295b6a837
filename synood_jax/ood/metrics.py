"""OOD detection metrics (numpy, float64): AUROC, FPR at a TPR, AUPR-In/Out, ROC points.

Scores are higher = more in-distribution. Two conventions:
- 'id_positive' (MOS, MCM, NegLabel): ID is the positive class with score s; FPR95 is the share of
  OOD accepted at the operating point of 95% ID recall.
- 'ood_positive' (OpenOOD v1.5): OOD is the positive class with score -s; FPR95 is the share of ID
  rejected at the operating point of 95% OOD recall.

The curve. With P positives and N negatives, at each distinct score t_1 > t_2 > ... > t_K:
  tps_k = #{pos >= t_k},  fps_k = #{neg >= t_k},  TPR_k = tps_k / P,  FPR_k = fps_k / N.
Where the curve reaches TPR = 0.95 differs between the peers' evaluation code; each rule is named:
- 'neglabel' (MOS / MCM / NegLabel `fpr_and_fdr_at_recall`): over the points k <= L, L = the first
  point with tps_k = P, the one whose recall is nearest: k* = argmin_k |tps_k / P - 0.95| (float64),
  ties to the largest k (lowest threshold, largest FPR). FPR95 = fps_k* / N.
- 'openood' (OpenOOD v1.5 `compute_all_metrics`: sklearn `roc_curve` with its default
  drop_intermediate=True): drop every interior point k with fps_{k-1} - 2 fps_k + fps_{k+1} = 0 and
  tps_{k-1} - 2 tps_k + tps_{k+1} = 0 (collinear with its neighbours), prepend (0, 0), then
  FPR95 = FPR of the first remaining point with TPR >= 0.95.
- 'exact': FPR of the first point of the full curve (with (0, 0) prepended) with TPR >= 0.95, i.e.
  the operating point of the highest threshold that reaches 95% recall.
The defaults (`DEFAULT_FPR_RULES`) reproduce the published tables: 'neglabel' for ID positive,
'openood' for OOD positive.
AUROC is the same under both conventions; AUPR-In and AUPR-Out are sklearn's average precision
(sum_k (R_k - R_{k-1}) P_k) with ID positive on s, and OOD positive on -s, in both conventions (MCM's
and NegLabel's `average_precision_score`; OpenOOD v1.5 instead integrates the PR curve by trapezoids).
"""
from __future__ import annotations

import numpy as np

CONVENTIONS = ("id_positive", "ood_positive")
FPR_RULES = ("neglabel", "openood", "exact")
DEFAULT_FPR_RULES = {"id_positive": "neglabel", "ood_positive": "openood"}
RULE_TEXT = {
    "neglabel": "recall nearest 0.95, ties to the lowest threshold (MOS / MCM / NegLabel)",
    "openood": "first point with TPR >= 0.95 on sklearn's roc_curve(drop_intermediate=True) (OpenOOD v1.5)",
    "exact": "first point with TPR >= 0.95 on the full ROC curve",
}


def check_scores(x, what: str) -> np.ndarray:
  """float64 [n] scores; raise naming `what` (e.g. "method 'mcm', set 'sun'") if empty or non-finite."""
  x = np.asarray(x, dtype=np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError(f"{what}: no scores")
  bad = np.flatnonzero(~np.isfinite(x))
  if bad.size:
    raise ValueError(f"{what}: {bad.size} of {x.size} scores are not finite (first at index {bad[0]}: "
                     f"{x[bad[0]]})")
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
  s_id, s_ood = check_scores(id_scores, "metrics: id_scores"), check_scores(ood_scores, "metrics: ood_scores")
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


# ------------------------------------------------------------------------------------------------
# FPR at a TPR: each rule maps (tps, fps) at the distinct thresholds to the false positives counted.

def _first_reaching(tps: np.ndarray, fps: np.ndarray, tpr: float) -> float:
  # the curve starts at (0, 0) as sklearn's does; the last point has TPR = 1, so one always qualifies
  return np.r_[0.0, fps][np.argmax(np.r_[0.0, tps] / tps[-1] >= tpr)]


def _exact_rule(tps, fps, tpr):
  return _first_reaching(tps, fps, tpr)


def _openood_rule(tps, fps, tpr):
  if tps.size > 2:  # sklearn's drop_intermediate: keep the ends and every point where the curve bends
    keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
    tps, fps = tps[keep], fps[keep]
  return _first_reaching(tps, fps, tpr)


def _neglabel_rule(tps, fps, tpr):
  last = int(np.searchsorted(tps, tps[-1]))        # the first point with full recall
  recall = tps[last::-1] / tps[-1]                   # from it up to the highest threshold
  return fps[last::-1][np.argmin(np.abs(recall - tpr))]  # argmin takes the first: the lowest threshold


_RULES = {"neglabel": _neglabel_rule, "openood": _openood_rule, "exact": _exact_rule}


def default_rule(convention: str) -> str:
  if convention not in DEFAULT_FPR_RULES:
    raise ValueError(f"metrics: convention={convention!r} not in {CONVENTIONS}")
  return DEFAULT_FPR_RULES[convention]


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, convention: str = "id_positive",
               rule: str | None = None) -> float:
  """FPR at the operating point `rule` picks for TPR `tpr` (module docstring); default: the
  convention's published rule (`DEFAULT_FPR_RULES`)."""
  rule = default_rule(convention) if rule is None else rule
  if rule not in _RULES:
    raise ValueError(f"metrics: fpr95 rule {rule!r} not in {FPR_RULES}")
  pos, neg = _split(id_scores, ood_scores, convention)
  tps, fps, _ = _binary_curve(pos, neg)
  return float(_RULES[rule](tps, fps, tpr) / neg.size)


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


def ood_metrics(id_scores, ood_scores, convention: str = "id_positive", tpr: float = 0.95,
                rule: str | None = None) -> dict:
  """dict(fpr95, auroc, aupr_in, aupr_out); only fpr95 depends on the convention (and the rule)."""
  return dict(fpr95=fpr_at_tpr(id_scores, ood_scores, tpr, convention, rule),
              auroc=auroc(id_scores, ood_scores),
              aupr_in=aupr_in(id_scores, ood_scores),
              aupr_out=aupr_out(id_scores, ood_scores))


def compute_metrics(scores, id_set: str, ood_sets, rules=None) -> dict:
  """{method: {convention: {ood_set: metrics, 'average': mean over sets}}} of scores {method: {set: [n]}};
  `rules`: convention -> FPR95 rule (default `DEFAULT_FPR_RULES`). Empty or non-finite scores: an error
  naming both."""
  rules = dict(DEFAULT_FPR_RULES if rules is None else rules)
  out = {}
  for method, by_set in scores.items():
    checked = {s: check_scores(by_set[s], f"method {method!r}, set {s!r}") for s in [id_set, *ood_sets]}
    out[method] = {}
    for conv, rule in rules.items():
      per = {s: ood_metrics(checked[id_set], checked[s], conv, rule=rule) for s in ood_sets}
      per["average"] = {k: float(np.mean([per[s][k] for s in ood_sets])) for k in per[ood_sets[0]]}
      out[method][conv] = per
  return out
