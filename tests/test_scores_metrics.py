"""scores.py against numpy/scipy formulas; metrics.py against sklearn."""
import numpy as np
import pytest
import scipy.special as sps
from sklearn import metrics as skm

from synood_jax.ood import metrics, scores


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def feats():
  rng = np.random.default_rng(0)
  return _unit(rng, 16, 32), _unit(rng, 10, 32), _unit(rng, 53, 32)  # img, ID text, negatives


# ------------------------------------------------------------------------------------------ scores

def test_group_negatives():
  idx = scores.group_negatives(53, 10, seed=0)
  assert idx.shape == (10, 5)
  np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(50))  # the last 3 dropped first
  np.testing.assert_array_equal(idx.ravel(), np.random.default_rng(0).permutation(50))
  np.testing.assert_array_equal(scores.group_negatives(53, 10, permutation=np.arange(50)[::-1]).ravel(),
                                np.arange(50)[::-1])
  with pytest.raises(ValueError, match="permutation"):
    scores.group_negatives(53, 10, permutation=np.arange(49))


def _neglabel_loop(img, id_text, neg_text, groups, temperature, seed):
  img, id_text, neg_text = (np.asarray(a, np.float64) for a in (img, id_text, neg_text))
  m = neg_text.shape[0]
  neg = neg_text[: m - m % groups]
  neg = neg[np.random.default_rng(seed).permutation(neg.shape[0])]
  k = neg.shape[0] // groups
  out = np.zeros(img.shape[0])
  for n in range(img.shape[0]):
    masses = []
    for g in range(groups):
      logits = np.concatenate([id_text @ img[n], neg[g * k:(g + 1) * k] @ img[n]]) / temperature
      p = np.exp(logits - logits.max())
      p /= p.sum()
      masses.append(p[: id_text.shape[0]].sum())
    out[n] = np.mean(masses)
  return out


@pytest.mark.parametrize("groups,temperature", [(10, 0.01), (4, 0.05)])
def test_neglabel_matches_loop(feats, groups, temperature):
  img, id_text, neg = feats
  got = scores.neglabel_score(img, id_text, neg, groups=groups, temperature=temperature, seed=3)
  np.testing.assert_allclose(np.asarray(got), _neglabel_loop(img, id_text, neg, groups, temperature, 3),
                             atol=1e-6)


def test_neglabel_explicit_index_and_single_group(feats):
  img, id_text, neg = feats
  idx = scores.group_negatives(53, 10, seed=3)
  np.testing.assert_allclose(scores.neglabel_score(img, id_text, neg, index=idx),
                             scores.neglabel_score(img, id_text, neg, groups=10, seed=3), atol=1e-7)
  # G = 1 keeps every negative (53 mod 1 = 0), so it is the ungrouped score.
  np.testing.assert_allclose(scores.neglabel_score(img, id_text, neg, groups=1),
                             scores.neglabel_ungrouped(img, id_text, neg), atol=1e-6)
  logits = np.concatenate([img @ id_text.T, img @ neg.T], axis=1).astype(np.float64) / 0.01
  ref = sps.softmax(logits, axis=1)[:, :10].sum(axis=1)
  np.testing.assert_allclose(scores.neglabel_ungrouped(img, id_text, neg), ref, atol=1e-6)


def test_neglabel_inside_jit_with_sharded_batch(feats):
  import jax
  from synood_jax import parallel
  img, id_text, neg = feats
  mesh = parallel.make_mesh()
  sharded = parallel.global_batch(img, mesh)  # 16 rows over the 8 fake devices
  fn = jax.jit(lambda x, t, n: scores.neglabel_score(x, t, n, groups=10, seed=3))
  np.testing.assert_allclose(np.asarray(fn(sharded, id_text, neg)),
                             _neglabel_loop(img, id_text, neg, 10, 0.01, 3), atol=1e-6)


def test_logit_and_mcm_scores(feats):
  img, id_text, _ = feats
  cos = (img @ id_text.T).astype(np.float64)
  np.testing.assert_allclose(scores.mcm_score(img, id_text), sps.softmax(cos, axis=1).max(axis=1), atol=1e-6)
  np.testing.assert_allclose(scores.mcm_score(img, id_text, temperature=0.1),
                             sps.softmax(cos / 0.1, axis=1).max(axis=1), atol=1e-6)
  logits = np.asarray(scores.cosine_logits(img, id_text))  # 100 * cos
  np.testing.assert_allclose(logits, 100 * cos, atol=1e-4)
  l64 = logits.astype(np.float64)
  np.testing.assert_allclose(scores.energy_score(logits), sps.logsumexp(l64, axis=1), rtol=1e-6)
  np.testing.assert_allclose(scores.energy_score(logits, temperature=2.0),
                             2.0 * sps.logsumexp(l64 / 2.0, axis=1), rtol=1e-6)
  np.testing.assert_allclose(scores.msp_score(logits), sps.softmax(l64, axis=1).max(axis=1), atol=1e-6)
  np.testing.assert_allclose(scores.max_logit_score(logits), l64.max(axis=1), rtol=1e-7)


# ----------------------------------------------------------------------------------------- metrics
# The peers' FPR95 rules, rederived here from what each one documents (not from our code):
# - MCM / NegLabel (`fpr_and_fdr_at_recall`): sweep every distinct score t as a threshold (accept
#   s >= t), from the lowest that still accepts every positive upward; keep the t whose recall is
#   nearest the level, the lowest t on a tie.
# - OpenOOD v1.5 (`compute_all_metrics`): sklearn's roc_curve with its defaults, then
#   fpr[argmax(tpr >= level)], on OOD-positive labels and negated confidences.
# - exact: the highest threshold whose recall reaches the level.

def _nearest_recall_fpr(pos, neg, level=0.95):
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  best = None
  for t in np.unique(np.r_[pos, neg]):  # ascending
    if t > pos.min() or t == pos.min():
      gap = abs(np.sum(pos >= t) / pos.size - level)
      if best is None or gap < best[0]:
        best = (gap, np.sum(neg >= t) / neg.size)
  return best[1]


def _highest_threshold_fpr(pos, neg, level=0.95):
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  reaching = [t for t in np.unique(np.r_[pos, neg]) if np.sum(pos >= t) / pos.size >= level]
  return np.sum(neg >= max(reaching)) / neg.size


def _openood_fpr(s_id, s_ood, level=0.95):
  conf = np.r_[s_id, s_ood]
  label = np.r_[np.zeros(len(s_id)), -np.ones(len(s_ood))]  # OpenOOD: -1 marks OOD
  fpr, tpr, _ = skm.roc_curve((label == -1).astype(int), -conf)
  return fpr[np.argmax(tpr >= level)]


def _sk_fpr(pos, neg, tpr=0.95, drop_intermediate=False):
  y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
  fpr, tprs, _ = skm.roc_curve(y, np.r_[pos, neg], drop_intermediate=drop_intermediate)
  return fpr[np.argmax(tprs >= tpr)]


def _reference_fpr(rule, s_id, s_ood, convention, level=0.95):
  pos, neg = (s_id, s_ood) if convention == "id_positive" else (-np.asarray(s_ood), -np.asarray(s_id))
  if rule == "neglabel":
    return _nearest_recall_fpr(pos, neg, level)
  if rule == "openood":
    return _sk_fpr(pos, neg, level, drop_intermediate=True)
  return _highest_threshold_fpr(pos, neg, level)


def _sk_all(s_id, s_ood):
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  s = np.r_[s_id, s_ood]
  return dict(auroc=skm.roc_auc_score(y, s), aupr_in=skm.average_precision_score(y, s),
              aupr_out=skm.average_precision_score(1 - y, -s))


def _cases():
  rng = np.random.default_rng(1)
  yield rng.normal(1, 1, 500), rng.normal(0, 1.3, 700)                    # continuous
  yield rng.integers(0, 6, 400).astype(float), rng.integers(0, 4, 300).astype(float)  # heavy ties
  yield np.round(rng.uniform(size=1000), 1), np.round(rng.uniform(size=20) * 0.8, 1)  # ties, unbalanced
  yield np.full(50, 0.3), np.full(30, 0.3)                                   # all tied
  yield np.array([0.9]), np.array([0.1, 0.9, 0.95])                          # tiny
  yield np.r_[np.arange(2, 21.0), 0.5], np.array([1, 1.5, -1.0])             # issue 12's worked case
  yield np.arange(20.0), np.arange(20.0)                                     # collinear ties


@pytest.mark.parametrize("case", range(7))
def test_metrics_match_sklearn_and_each_peer_rule(case):
  s_id, s_ood = list(_cases())[case]
  ref = _sk_all(s_id, s_ood)
  got_id = metrics.ood_metrics(s_id, s_ood, "id_positive")
  got_ood = metrics.ood_metrics(s_id, s_ood, "ood_positive")
  for key in ("auroc", "aupr_in", "aupr_out"):
    assert abs(got_id[key] - ref[key]) <= 1e-9, key
    assert got_ood[key] == got_id[key]
  # The defaults are the published tables' rules: MCM / NegLabel's for ID positive, OpenOOD's for OOD positive.
  assert abs(got_id["fpr95"] - _nearest_recall_fpr(s_id, s_ood)) <= 1e-12
  assert abs(got_ood["fpr95"] - _openood_fpr(s_id, s_ood)) <= 1e-12
  for rule in metrics.FPR_RULES:
    for conv in metrics.CONVENTIONS:
      for level in (0.95, 0.8):
        want = _reference_fpr(rule, s_id, s_ood, conv, level)
        assert abs(metrics.fpr_at_tpr(s_id, s_ood, level, conv, rule) - want) <= 1e-12, (rule, conv, level)
  # exact = sklearn on the full curve, in both conventions
  assert abs(metrics.fpr_at_tpr(s_id, s_ood, rule="exact") - _sk_fpr(s_id, s_ood)) <= 1e-12
  assert abs(metrics.fpr_at_tpr(s_id, s_ood, convention="ood_positive", rule="exact")
             - _sk_fpr(-s_ood, -s_id)) <= 1e-12
  fpr, tpr, thr = metrics.roc_points(s_id, s_ood)
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, np.r_[s_id, s_ood], drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  np.testing.assert_array_equal(thr[1:], sk_thr[1:])


def test_fpr95_issue_cases():
  # ID = {2, ..., 20, 0.5}, OOD = {1, 1.5, -1}. Recall (20 ID) is 19/20 = 0.95 exactly at t = 2, 1.5
  # and 1; full recall first at t = 0.5. MCM / NegLabel: recall nearest 0.95, lowest such t: t = 1,
  # which accepts OOD {1, 1.5}: 2/3. The highest t reaching 0.95 is t = 2: no OOD accepted: 0.
  s_id, s_ood = np.r_[np.arange(2, 21.0), 0.5], np.array([1, 1.5, -1.0])
  assert abs(metrics.fpr_at_tpr(s_id, s_ood) - 2 / 3) <= 1e-12
  assert metrics.fpr_at_tpr(s_id, s_ood, rule="exact") == 0.0
  # Normal scores: 2222 of 3000 OOD accepted at the nearest recall, 2207 at the first reaching it.
  rng = np.random.default_rng(0)
  s_id, s_ood = rng.normal(1, 1, 2000), rng.normal(0, 1, 3000)
  assert abs(metrics.fpr_at_tpr(s_id, s_ood) - 2222 / 3000) <= 1e-12
  assert abs(metrics.fpr_at_tpr(s_id, s_ood) - _nearest_recall_fpr(s_id, s_ood)) <= 1e-12
  assert abs(metrics.fpr_at_tpr(s_id, s_ood, rule="exact") - 2207 / 3000) <= 1e-12
  assert abs(metrics.fpr_at_tpr(s_id, s_ood, rule="exact") - _highest_threshold_fpr(s_id, s_ood)) <= 1e-12
  # ID = OOD = 0..19: the points (k/20, k/20) are collinear, so sklearn's default roc_curve keeps only
  # (0,0), (1/20, 1/20) and (1,1); the first with TPR >= 0.95 is (1, 1): OpenOOD reports 1.0. The real
  # operating point t = 1 (19 of 20 on each side) gives 0.95.
  s = np.arange(20.0)
  assert metrics.fpr_at_tpr(s, s, convention="ood_positive") == 1.0 == _openood_fpr(s, s)
  assert metrics.fpr_at_tpr(s, s, convention="ood_positive", rule="exact") == pytest.approx(0.95, abs=1e-12)
  assert metrics.fpr_at_tpr(s, s) == pytest.approx(0.95, abs=1e-12)


def test_fpr95_rules_worked_by_hand():
  # Ties between ID and OOD: ID = 1..10, OOD = {1, 5.5}. Points (recall, OOD accepted): t = 2: (0.9, 1),
  # t = 1: (1.0, 2). In float64 |0.9 - 0.95| = 0.04999999999999993 < |1.0 - 0.95| = 0.05000000000000004,
  # so MCM / NegLabel take t = 2: 1/2; the first point reaching 0.95 is t = 1: 2/2.
  s_id, s_ood = np.arange(1, 11.0), np.array([1.0, 5.5])
  assert metrics.fpr_at_tpr(s_id, s_ood) == 0.5
  assert metrics.fpr_at_tpr(s_id, s_ood, rule="exact") == 1.0 == metrics.fpr_at_tpr(s_id, s_ood, rule="openood")
  # Recall never near 0.95: ID = {1, 2, 3}, OOD = {0, 2.5}: recalls 1/3, 1/3, 2/3, 1 at t = 3, 2.5, 2, 1;
  # every rule takes t = 1 (full recall), which accepts OOD 2.5: 1/2.
  for rule in metrics.FPR_RULES:
    assert metrics.fpr_at_tpr([1, 2, 3], [0, 2.5], rule=rule) == 0.5
  # Recall 0.95 hit exactly: ID = 1..20, OOD: 18 at 0.5, 3.5, 10.5.
  # ID positive: recall 19/20 only at t = 2, which accepts OOD {3.5, 10.5}: every rule gives 2/20.
  # OOD positive (score -s): 19 of 20 OOD caught first at -s >= -3.5, i.e. s <= 3.5, which rejects ID
  # {1, 2, 3}: 3/20 (the points around it bend, so OpenOOD's dropped curve keeps it). The recall stays
  # 19/20 down to -s >= -10, and MCM / NegLabel take that lowest threshold: ID {1, ..., 10}: 10/20.
  s_id = np.arange(1, 21, dtype=float)
  s_ood = np.r_[np.full(18, 0.5), 3.5, 10.5]
  for rule in metrics.FPR_RULES:
    assert metrics.fpr_at_tpr(s_id, s_ood, rule=rule) == pytest.approx(0.10, abs=1e-12)
  for rule, want in (("exact", 0.15), ("openood", 0.15), ("neglabel", 0.5)):
    assert metrics.fpr_at_tpr(s_id, s_ood, convention="ood_positive", rule=rule) == pytest.approx(want, abs=1e-12)


def test_metrics_errors_name_the_input():
  with pytest.raises(ValueError, match="convention"):
    metrics.ood_metrics([1.0], [0.0], convention="ood")
  with pytest.raises(ValueError, match="rule 'nearest'"):
    metrics.fpr_at_tpr([1.0], [0.0], rule="nearest")
  with pytest.raises(ValueError, match="ood_scores: no scores"):
    metrics.auroc([1.0], [])
  with pytest.raises(ValueError, match=r"method 'mcm', set 'sun': 1 of 3 scores are not finite \(first at "
                                       r"index 1"):
    metrics.check_scores([0.0, np.nan, 1.0], "method 'mcm', set 'sun'")
