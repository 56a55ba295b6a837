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

def _sk_fpr(pos, neg, tpr=0.95, drop_intermediate=False):
  y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
  fpr, tprs, _ = skm.roc_curve(y, np.r_[pos, neg], drop_intermediate=drop_intermediate)
  return fpr[np.argmax(tprs >= tpr)]


def _sk_all(s_id, s_ood):
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  s = np.r_[s_id, s_ood]
  return dict(auroc=skm.roc_auc_score(y, s), aupr_in=skm.average_precision_score(y, s),
              aupr_out=skm.average_precision_score(1 - y, -s),
              fpr95_id=_sk_fpr(s_id, s_ood), fpr95_ood=_sk_fpr(-s_ood, -s_id))


def _cases():
  rng = np.random.default_rng(1)
  yield rng.normal(1, 1, 500), rng.normal(0, 1.3, 700)                    # continuous
  yield rng.integers(0, 6, 400).astype(float), rng.integers(0, 4, 300).astype(float)  # heavy ties
  yield np.round(rng.uniform(size=1000), 1), np.round(rng.uniform(size=20) * 0.8, 1)  # ties, unbalanced
  yield np.full(50, 0.3), np.full(30, 0.3)                                   # all tied
  yield np.array([0.9]), np.array([0.1, 0.9, 0.95])                          # tiny


@pytest.mark.parametrize("case", range(5))
def test_metrics_match_sklearn(case):
  s_id, s_ood = list(_cases())[case]
  ref = _sk_all(s_id, s_ood)
  got_id = metrics.ood_metrics(s_id, s_ood, "id_positive")
  got_ood = metrics.ood_metrics(s_id, s_ood, "ood_positive")
  for key in ("auroc", "aupr_in", "aupr_out"):
    assert abs(got_id[key] - ref[key]) <= 1e-9, key
    assert got_ood[key] == got_id[key]
  assert abs(got_id["fpr95"] - ref["fpr95_id"]) <= 1e-9
  assert abs(got_ood["fpr95"] - ref["fpr95_ood"]) <= 1e-9
  assert abs(metrics.fpr_at_tpr(s_id, s_ood, tpr=0.8) - _sk_fpr(s_id, s_ood, 0.8)) <= 1e-9
  fpr, tpr, thr = metrics.roc_points(s_id, s_ood)
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, np.r_[s_id, s_ood], drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  np.testing.assert_array_equal(thr[1:], sk_thr[1:])


def test_fpr95_conventions_worked_case():
  # ID scores 1..20; OOD: 18 at 0.5, one at 3.5, one at 10.5.
  # ID positive: 95% of ID (19 of 20) is accepted first at t = 2 (ID 2..20). OOD with s >= 2:
  #   {3.5, 10.5} -> FPR95 = 2/20 = 0.10.
  # OOD positive (score -s): 95% of OOD (19 of 20) is caught first at -s >= -3.5, i.e. s <= 3.5
  #   (the 18 at 0.5 and 3.5). ID with s <= 3.5: {1, 2, 3} -> FPR95 = 3/20 = 0.15.
  s_id = np.arange(1, 21, dtype=float)
  s_ood = np.r_[np.full(18, 0.5), 3.5, 10.5]
  assert metrics.fpr_at_tpr(s_id, s_ood, convention="id_positive") == pytest.approx(0.10, abs=1e-12)
  assert metrics.fpr_at_tpr(s_id, s_ood, convention="ood_positive") == pytest.approx(0.15, abs=1e-12)
  assert metrics.ood_metrics(s_id, s_ood)["fpr95"] == pytest.approx(_sk_fpr(s_id, s_ood, drop_intermediate=True))
  with pytest.raises(ValueError, match="convention"):
    metrics.ood_metrics(s_id, s_ood, convention="ood")
  with pytest.raises(ValueError, match="ood_scores"):
    metrics.auroc(s_id, [])


def test_fpr95_uses_full_curve_not_dropped_points():
  # ID = OOD = 0..19: the points (k/20, k/20) are collinear, and sklearn's default
  # roc_curve(drop_intermediate=True) keeps only (0,0) and (1,1), so fpr[argmax(tpr >= .95)] = 1.0.
  # The real operating point t = 1 accepts 19/20 ID and 19/20 OOD: FPR95 = 0.95 (drop_intermediate=False).
  s = np.arange(20.0)
  assert metrics.fpr_at_tpr(s, s) == pytest.approx(0.95, abs=1e-12)
  assert _sk_fpr(s, s) == pytest.approx(0.95, abs=1e-12)
  assert _sk_fpr(s, s, drop_intermediate=True) == 1.0
