"""Image health (issue 11, items 1 and 4): statuses by hand-made cases, a diverging refinement step keeps
the last finite noise, the run stops with counts and a cause, and an all-flagged synthesis names what
removed every image. The end-to-end case is the reported one: the demo config with step_size=inf,
which used to write NaN scores and identical black PNGs marked `stayed_in_distribution: false`."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from synood_jax.data import datasets as data
from synood_jax.pipeline import stages
from synood_jax.pipeline.workdir import Workdir
from synood_jax.synthesis import health, refinement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(b, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, size=(b, 8, 8, 3)).astype(np.float32)


def test_statuses_by_hand():
  m, band = -3.0, 1.0
  x = _images(7)
  scores = np.full((3, 7), -3.2)                 # last s inside the band: ok
  steps = np.ones(7, bool)
  x[1, 0, 0, 0] = np.nan                         # NaN pixel
  scores[1, 2] = np.inf                          # an inf score in an earlier iteration
  steps[3] = False                               # a non-finite refinement update
  x[4] = 0.5 + 0.002 * _images(1, 1)[0]          # near-constant: std 0.0006 < 0.01
  scores[-1, 5] = -4.5                           # s < m - band = -4: still in-distribution
  got = health.classify_batch(x, scores, steps, target=m, band=band)
  assert got == ["ok", "nonfinite", "nonfinite", "nonfinite", "degenerate", "in_distribution", "ok"]
  # a copy within one grey level of another output: both degenerate (the other images differ a lot)
  y = _images(3, 2)
  y[2] = np.clip(y[0] + 0.7 / 255, 0, 1)
  assert health.classify_batch(y, np.full((1, 3), m), np.ones(3, bool), target=m, band=band) == [
      "degenerate", "ok", "degenerate"]
  assert health.counts(got) == {"ok": 2, "nonfinite": 3, "degenerate": 1, "in_distribution": 1}
  # records written before statuses existed keep their meaning
  assert health.status_of({"stayed_in_distribution": True}) == "in_distribution"
  assert health.status_of({"stayed_in_distribution": False}) == "ok"


def test_finite_step_keeps_the_last_finite_eps():
  eps = jnp.arange(12, dtype=jnp.float32).reshape(3, 2, 2)
  new = eps + 1.0
  new = new.at[1, 0, 1].set(jnp.nan).at[2, 1, 1].set(jnp.inf)
  kept, ok = health.finite_step(eps, new)
  np.testing.assert_array_equal(np.asarray(ok), [True, False, False])
  np.testing.assert_array_equal(np.asarray(kept), np.concatenate([np.asarray(eps[:1]) + 1, np.asarray(eps[1:])]))


def _toy_refine(step_size, eps):
  """refine() on a linear 'sampler', identity decoder and a 3-class linear classifier: the loop is the
  real one, the models are hand-made so that the update is known."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(eps[0].size, 3)), jnp.float32)
  cfg, hyper = refinement.RefineConfig(iterations=3), refinement.Hyper.make(step_size, -1.5)
  models = refinement.Models(noise=lambda e: e, sample=lambda p, z: z, input=lambda z: z,
                             decode=lambda p, z: jax.nn.sigmoid(z), logits=lambda p, x: x.reshape(x.shape[0], -1) @ w)
  return refinement.refine(cfg, hyper, models, {}, eps)


def test_diverging_step_keeps_eps_and_marks_the_image():
  eps0 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 1)), jnp.float32)
  images, scores, losses, eps, finite = _toy_refine(jnp.inf, eps0)
  # r = inf: every update is non-finite, so each image keeps its initial eps and is marked
  np.testing.assert_array_equal(np.asarray(eps), np.asarray(eps0))
  assert not np.asarray(finite).any() and np.isfinite(np.asarray(scores)).all()
  assert health.classify_batch(np.asarray(images), np.asarray(scores), np.asarray(finite), target=-1.5,
                               band=1.0) == ["nonfinite", "nonfinite"]
  # a finite step moves eps and is not marked
  _, _, _, eps_ok, finite_ok = _toy_refine(0.5, eps0)
  assert np.asarray(finite_ok).all() and np.abs(np.asarray(eps_ok) - np.asarray(eps0)).max() > 1e-3


def _cfg(**kw):
  c = dict(step_size=float("inf"), target=-5.0, band=2.0, iterations=3, max_not_ok=0.05)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_monitor_stops_with_counts_and_cause():
  mon = health.Monitor(_cfg(), total=50_000, where="/w/synthesis/manifest.jsonl")
  mon.add(["ok"] * 20 + ["in_distribution"] * 5)
  mon.check()                                    # 5 of 25, far from 5% of 50,000: go on
  mon.add(["nonfinite"] * 16)                    # 21 of 41 (51%) after >= 32 images: a broken setting
  with pytest.raises(health.SynthesisHealthError) as e:
    mon.check()
  msg = str(e.value)
  print(msg)
  assert "after 41 of 50000 images" in msg and "21 of 41 images (51%) are not ok" in msg
  assert "nonfinite 16, degenerate 0, in_distribution 5; ok 20" in msg
  assert "synthesis.step_size=inf is probably too large" in msg and "manifest.jsonl" in msg
  # the exact bound: more not-ok images than the share allows of the total can never pass
  small = health.Monitor(_cfg(step_size=1e30), total=24, where="m")
  small.add(["degenerate"] * 2)
  assert small.verdict() is not None and "collapsed to flat or identical pixels" in small.verdict()
  never = health.Monitor(_cfg(max_not_ok=1.0), total=8, where="m")
  never.add(["nonfinite"] * 8)
  assert never.verdict(final=True) is None
  run = health.Monitor(_cfg(step_size=10.0), total=24, where="m")
  run.add(["ok"] * 23 + ["in_distribution"])
  assert run.verdict(final=True) is None          # 1 of 24 = 4.2%: within 5%
  run.statuses[0] = "in_distribution"             # 2 of 24 = 8.3%
  assert "2 of 24 images (8%) are not ok" in run.verdict(final=True)
  assert "did not reach the boundary" in run.verdict(final=True)


def test_all_flagged_run_names_the_cause(tmp_path):
  """Before: `DataError: synthetic: no readable image among 0 records` after the whole synthesis."""
  manifest = [{"source": f"c/{i}.JPEG", "output": f"c/{i}_ood.png", "scores": [-9.0, -8.0],
               "stayed_in_distribution": True, "status": "in_distribution"} for i in range(24)]
  with pytest.raises(ValueError, match=r"pseudo.drop_flagged removed 24 of 24 \(in_distribution"):
    health.training_records(manifest, drop_flagged=True)
  assert len(health.training_records(manifest, drop_flagged=False)) == 24  # the official code keeps them
  mixed = manifest[:20] + [dict(m, status="nonfinite") for m in manifest[20:]]
  with pytest.raises(ValueError, match="4 of 24 are nonfinite .* removed 20 of 24"):
    health.training_records(mixed)
  # the features stage raises it before loading any model
  wd = Workdir(str(tmp_path))
  os.makedirs(wd.synthesis)
  with open(wd.synthesis_manifest, "w") as f:
    f.writelines(json.dumps(m) + "\n" for m in manifest)
  open(wd.sources, "w").close()
  sys.path.insert(0, ROOT)
  from configs import demo
  with pytest.raises(data.DataError, match="features: no synthetic image .*drop_flagged removed 24 of 24"):
    stages.stage_features(stages.Context(demo.get_config(), wd))
  # and synthesis itself stops on such a run: 24 of 24 still in-distribution
  mon = health.Monitor(_cfg(step_size=10.0), total=24, where="m")
  mon.add(["in_distribution"] * 8)
  with pytest.raises(health.SynthesisHealthError, match="in_distribution 8.*did not reach the boundary"):
    mon.check()


def test_step_size_inf_run_stops_with_a_clear_error(tmp_path):
  """The reported run: demo config, synthesis.step_size=inf. Before: NaN scores, identical black PNGs,
  `flagged 0`. Now every image is marked nonfinite (its last finite eps kept) and synthesis stops."""
  sys.path.insert(0, ROOT)
  from configs import demo
  c = demo.get_config()
  c.compile_cache_dir = os.environ["SYNOOD_COMPILE_CACHE"]
  c.synthesis.step_size = float("inf")
  with pytest.raises(health.SynthesisHealthError) as e:
    stages.run(c, str(tmp_path), ["models", "data", "sources", "synthesis"])
  msg = str(e.value)
  print(msg)
  assert "synthesis stopped after 8 of 32 images: 8 of 8 images (100%) are not ok (nonfinite 8" in msg
  assert "synthesis.step_size=inf is probably too large" in msg
  wd = Workdir(str(tmp_path))
  assert not os.path.exists(wd.done("synthesis"))
  rows = [json.loads(line) for line in open(wd.synthesis_manifest)]
  assert len(rows) == 8 and {r["status"] for r in rows} == {"nonfinite"}
  assert all(np.isfinite(r["scores"]).all() for r in rows)   # the kept eps gives finite scores
  pixels = [np.asarray(Image.open(os.path.join(wd.synthesis, r["output"]))) for r in rows]
  assert all(p.std() > 10 for p in pixels)                     # not the black images of before
