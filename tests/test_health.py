"""Image health (issue 11, items 1 and 4; issue 21): statuses by hand-made cases, a diverging refinement
step keeps the last finite noise, the run stops with counts and a cause on failures only, and an
all-flagged synthesis names what removed every image. The end-to-end cases: the demo config with
step_size=inf, which used to write NaN scores and identical black PNGs marked
`stayed_in_distribution: false`; and the paper config on a 1000-class classifier as confident as a
trained one (s near -15), which used to stop after its first batch on `in_distribution` images."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
from PIL import Image

from synood_jax.data import datasets as data
from synood_jax.pipeline import run_context, runner, stages, values
from synood_jax.pipeline.workdir import Workdir
from synood_jax import parallel
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
  got = health.classify_batch(x, scores, steps, target=m, band=band, num_classes=2)
  assert got == ["ok", "nonfinite", "nonfinite", "nonfinite", "degenerate", "in_distribution", "ok"]
  # a copy within one grey level of another output: both degenerate (the other images differ a lot)
  y = _images(3, 2)
  y[2] = np.clip(y[0] + 0.7 / 255, 0, 1)
  assert health.classify_batch(y, np.full((1, 3), m), np.ones(3, bool), target=m, band=band, num_classes=2) == [
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
                               band=1.0, num_classes=3) == ["nonfinite", "nonfinite"]
  # a finite step moves eps and is not marked
  _, _, _, eps_ok, finite_ok = _toy_refine(0.5, eps0)
  assert np.asarray(finite_ok).all() and np.abs(np.asarray(eps_ok) - np.asarray(eps0)).max() > 1e-3


def _cfg(**kw):
  c = dict(step_size=float("inf"), target=-5.0, band=2.0, iterations=3, max_not_ok=0.05)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_monitor_stops_with_counts_and_cause():
  mon = health.Monitor(_cfg(), total=50_000, where="/w/synthesis/manifest.jsonl")
  mon.add(["ok"] * 10 + ["in_distribution"] * 5)
  mon.check()                                    # no failure: go on
  mon.add(["nonfinite"] * 16)                    # 16 of 31: under 32 images, far from 5% of 50,000: go on
  mon.check()
  mon.add(["nonfinite"])                         # 17 of 32 (53%) after >= 32 images: a broken setting
  with pytest.raises(health.SynthesisHealthError) as e:
    mon.check()
  msg = str(e.value)
  print(msg)
  assert "after 32 of 50000 images" in msg and "17 of 32 images (53%) failed" in msg
  assert "nonfinite 17, degenerate 0; not failures: in_distribution 5, ok 10" in msg
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
  run.statuses[:20] = ["in_distribution"] * 20     # in_distribution is an outcome: never a stop
  assert run.verdict(final=True) is None
  run.statuses[0:2] = ["degenerate"] * 2           # 2 of 24 failed = 8.3%
  assert "2 of 24 images (8%) failed" in run.verdict(final=True)
  assert "collapsed to flat or identical pixels" in run.verdict(final=True)


def test_all_flagged_run_names_the_cause(tmp_path):
  """Before: `DataError: synthetic: no readable image among 0 records` after the whole synthesis."""
  manifest = [{"source": f"c/{i}.JPEG", "output": f"c/{i}_ood.png", "scores": [-9.0, -8.0],
               "stayed_in_distribution": True, "status": "in_distribution"} for i in range(24)]
  with pytest.raises(ValueError, match=r"pseudo.drop_flagged removed 24 of 24 \(in_distribution"):
    health.training_records(manifest, drop_flagged=True)
  assert len(health.training_records(manifest, drop_flagged=False)) == 24  # the official code keeps them
  mixed = manifest[:20] + [dict(m, status="nonfinite") for m in manifest[20:]]
  with pytest.raises(ValueError, match="4 of 24 are nonfinite .* removed 20 of 24"):
    health.training_records(mixed, drop_flagged=True)
  # the features stage raises it before loading any model
  wd = Workdir(str(tmp_path))
  os.makedirs(wd.synthesis)
  with open(wd.synthesis_manifest, "w") as f:
    f.writelines(json.dumps(m) + "\n" for m in manifest)
  open(wd.sources, "w").close()
  sys.path.insert(0, ROOT)
  from configs import demo
  c = demo.get_config()
  c.pseudo.drop_flagged = True                   # the option; off by default (the official procedure)
  with pytest.raises(data.DataError, match="features: no synthetic image .*drop_flagged removed 24 of 24"):
    stages.encode_features(run_context.RunContext(c, wd))
  # synthesis itself never stops on such a run (issue 21; before: it stopped after 8 of 24)
  mon = health.Monitor(_cfg(step_size=10.0), total=24, where="m")
  mon.add(["in_distribution"] * 24)
  mon.check(final=True)


def test_step_size_inf_run_stops_with_a_clear_error(tmp_path, monkeypatch):
  """The reported run: demo config, synthesis.step_size=inf. Before: NaN scores, identical black PNGs,
  `flagged 0`. Now the pipeline refuses the value before any stage runs; and where it still reaches
  synthesis (the library's `synthesize` takes what it is given; here the up-front check is switched off),
  every image is marked nonfinite (its last finite eps kept) and synthesis stops."""
  sys.path.insert(0, ROOT)
  from configs import demo
  c = demo.get_config()
  c.compile_cache_dir = os.environ["SYNOOD_COMPILE_CACHE"]
  c.synthesis.step_size = float("inf")
  with pytest.raises(values.ConfigValueError, match=r"config.synthesis.step_size=inf: not a finite number"):
    runner.run(c, str(tmp_path / "refused"), ["models", "data", "sources", "synthesis"])
  assert not os.path.exists(tmp_path / "refused" / "models")
  monkeypatch.setattr(values, "validate", lambda config: None)
  with pytest.raises(health.SynthesisHealthError) as e:
    runner.run(c, str(tmp_path), ["models", "data", "sources", "synthesis"])
  msg = str(e.value)
  print(msg)
  assert "synthesis stopped after 8 of 32 images: 8 of 8 images (100%) failed (nonfinite 8" in msg
  assert "synthesis.step_size=inf is probably too large" in msg
  wd = Workdir(str(tmp_path))
  assert not os.path.exists(wd.done("synthesis"))
  rows = [json.loads(line) for line in open(wd.synthesis_manifest)]
  assert len(rows) == 8 and {r["status"] for r in rows} == {"nonfinite"}
  assert all(np.isfinite(r["scores"]).all() for r in rows)   # the kept eps gives finite scores
  pixels = [np.asarray(Image.open(os.path.join(wd.synthesis, r["output"]))) for r in rows]
  assert all(p.std() > 10 for p in pixels)                     # not the black images of before


def test_in_distribution_rule_from_reachable_range_and_movement():
  """m* = min(m, -log C); in_distribution iff s_K < m* - band and s_K below half way from s_0 to m*."""
  x = _images(6, 3)
  top = -np.log(1000)                            # -6.908: the official m = -5 is out of reach
  s0 = np.array([-15.0, -15.0, -15.0, -8.0, -15.0, -6.95])
  sk = np.array([-8.5, -10.9, -11.0, -8.1, -14.0, -6.95])
  # -8.5: within band of m* (-8.908); -10.9: past half way (-10.954); -11.0: neither; -8.1: started
  # and stayed within band; -14.0: barely moved; -6.95: within 0.09 of uniform
  got = health.classify_batch(x, np.stack([s0, (s0 + sk) / 2, sk]), np.ones(6, bool), target=-5.0, band=2.0,
                              num_classes=1000)
  assert got == ["ok", "ok", "in_distribution", "ok", "in_distribution", "ok"]
  # the rule this replaces (s_K < m - band = -7) called all but the last in-distribution
  assert (sk < -7.0).tolist() == [True] * 5 + [False]
  assert health.reachable_target(-5.0, 1000) == pytest.approx(top)
  # a reachable m (4 classes, -log 4 = -1.386): m itself; 'msp_kl' ignores m and pulls towards uniform
  assert health.reachable_target(-1.8, 4) == -1.8
  assert health.reachable_target(-1.8, 4, "msp_kl") == pytest.approx(-np.log(4))
  four = health.stayed_in_distribution([-10.0, -10.0], [-3.7, -6.0], target=-1.8, band=2.0, num_classes=4)
  assert four.tolist() == [False, True]          # -3.7 within band of -1.8; -6.0 short of half way (-5.9)


def test_unreachable_target_warning_names_minus_log_c():
  assert health.target_warning(-5.0, 1000) == (
      "synthesis.target=-5.0 is above the highest score this classifier can give (-6.908 for 1000 classes): "
      "the refinement will push towards uniform predictions, as the official code does")
  assert health.target_warning(-1.8, 4) is None            # the demo: -log 4 = -1.386
  assert health.target_warning(-5.0, 1000, "msp_kl") is None  # its loss does not use m


# ---------------------------------------------------------------------------------------------
# The paper config on a classifier as confident as a trained one (issue 21).

def _confident_resnet(logits_images, target_s=-15.0):
  """A tiny 1000-class ResNet whose final layer is scaled so that the mean s over `logits_images` is
  `target_s` (as confident as a trained ResNet-50); (logits_fn, params). Its fc bias is zero, so the
  logits scale with the layer and s is monotone in the scale (found by bisection)."""
  from synood_jax.models import resnet
  from synood_jax.synthesis import guidance
  module = resnet.ResNet(layers=(1, 1, 1, 1), width=8, num_classes=1000)
  params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  logits_fn, _ = guidance.resnet50(module, params, resize=36, crop=32)  # the 32 px images' scale
  g = np.asarray(logits_fn(params, logits_images), np.float64)
  s = lambda a: float(np.mean(np.mean(a * g, -1) - scipy.special.logsumexp(a * g, axis=-1)))
  lo, hi = 0.0, 1e6
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if s(mid) > target_s else (lo, mid)
  fc = dict(params["fc"], kernel=params["fc"]["kernel"] * lo)
  return logits_fn, dict(params, fc=fc)


@pytest.fixture(scope="module")
def confident(tmp_path_factory):
  """Tiny SD-2 in-painting, 12 demo sources, the confident 1000-class ResNet, the paper's config."""
  from synood_jax.demo import image_sets as demo_images, tiny_sd
  from synood_jax.diffusion import inpaint_pipeline
  from synood_jax.synthesis import sources, synthesize
  sys.path.insert(0, ROOT)
  from configs import imagenet_vitb16
  root = tmp_path_factory.mktemp("confident")
  pipe, params = inpaint_pipeline.load_inpaint_pipeline(tiny_sd.make_tiny_inpaint_pipeline(str(root / "sd")))
  src = str(root / "src")
  demo_images.write_demo_images(src, {"a": ("stripes", 0.1), "b": ("rings", 0.6)}, 6, size=40)
  recs = list(sources.select_sources(src, per_class=6).records)
  # the tiny random VAE decodes textured noise: calibrate on noise, not on the sources
  logits_fn, cparams = _confident_resnet(np.random.default_rng(0).uniform(0, 1, (16, 32, 32, 3)))
  paper = imagenet_vitb16.get_config()
  cfg = ml_collections.ConfigDict(paper.synthesis.to_dict())
  cfg.update(image_size=32, batch_size=8, decode_chunk=0, log_every_secs=1000)  # the tiny models' scale

  def run(name, **overrides):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.update(overrides)
    return synthesize.synthesize(c, str(root / name), pipe, dict(params, classifier=cparams), logits_fn, src,
                                 recs, [f"A photo only remain {r.class_name}." for r in recs],
                                 parallel.make_mesh(devices=jax.devices()[:1]))
  return dict(root=root, run=run, paper=paper, recs=recs)


def test_paper_config_completes_on_a_confident_classifier(confident, caplog):
  """Before: every image had s_K < m - band = -7, counted as not ok, and the run stopped after 8 of 12."""
  import logging
  from synood_jax.pipeline import run_report
  paper = confident["paper"]
  assert (paper.synthesis.target, paper.synthesis.band, paper.synthesis.max_not_ok) == (-5.0, 2.0, 0.05)
  with caplog.at_level(logging.WARNING):
    made = confident["run"]("paper")
  assert ("synthesis.target=-5.0 is above the highest score this classifier can give (-6.908 for 1000 classes)"
          in caplog.text)
  assert len(made) == len(confident["recs"]) == 12          # ran to the end
  s = np.asarray([m["scores"] for m in made])
  c = health.counts([m["status"] for m in made])
  print("s_0", np.round(s[:, 0], 2), "\ns_K", np.round(s[:, -1], 2), "\n", c)
  assert -20 < s[:, 0].mean() < -10                          # scores like a trained classifier's
  assert (s[:, -1] < paper.synthesis.target - paper.synthesis.band).all()  # the old rule: all "not ok"
  assert c["nonfinite"] == c["degenerate"] == 0 and all(m["num_classes"] == 1000 for m in made)
  # the paper config keeps every finite, non-degenerate image for pseudo-labelling, as the official code
  kept = health.training_records(made, drop_flagged=bool(paper.pseudo.drop_flagged))
  assert [m["source"] for m in kept] == [m["source"] for m in made]
  # the report's picture of where they landed, with -log C and m marked
  wd = Workdir(str(confident["root"] / "report"))
  lines = run_report.score_lines(wd, paper.synthesis.to_dict(), {"synthesis": made})
  assert os.path.getsize(wd.report_scores) > 1000 and "report_scores.png" in lines[-1]
  assert any("Note: synthesis.target=-5.0 is above" in line for line in lines)


def test_diverging_step_still_stops_at_once(confident):
  with pytest.raises(health.SynthesisHealthError) as e:
    confident["run"]("inf", step_size=float("inf"))
  msg = str(e.value)
  print(msg)
  assert "synthesis stopped after 8 of 12 images: 8 of 8 images (100%) failed (nonfinite 8" in msg
