"""Synthesis stage (SynOOD stage 1): the boundary-refinement gradient against PyTorch autograd, the loss
kinds against hand formulas, and end-to-end synthesis on a tiny SD-2 in-painting pipeline (one vs eight
devices, batch composition, skip vs exact gradient)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
import scipy.stats
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from synood_jax.demo import images as demo_data
from synood_jax.synthesis import guidance, refinement, sources, synthesize as synthesis
from synood_jax import parallel
from synood_jax.models import zero_shot  # noqa: E402
from synood_jax.diffusion import inpaint, pipeline  # noqa: E402
from synood_jax.models import clip, resnet
from synood_jax.demo import tiny_clip as tiny, tiny_sd  # noqa: E402
from test_resnet import _random_resnet, _torch_preprocess  # noqa: E402

IMAGE, LATENT = 32, 16
CLASSNAMES = ["stripes", "rings"]
C = len(CLASSNAMES)
# s <= -log C (equality at uniform logits): a target just below it is one the tiny classifier can reach.
TARGET = float(-np.log(C) - 0.3)
N_SOURCES, BATCH, ITERATIONS = 12, 8, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Tiny SD-2 in-painting folder + tiny CLIP folder (our writers), demo JPEG sources, CLIP guidance."""
  root = tmp_path_factory.mktemp("synthesis")
  sd = tiny_sd.make_tiny_inpaint_pipeline(str(root / "sd"))
  clip_dir = tiny.make_tiny_clip(str(root / "clip"))
  src = str(root / "src")
  demo_data.write_demo_images(src, {"a": ("stripes", 0.1), "b": ("rings", 0.6)}, N_SOURCES // 2, size=40)
  recs = [vars(r) for r in sources.select_sources(src, per_class=N_SOURCES // 2).records]
  assert len(recs) == N_SOURCES
  pipe, params = pipeline.load_inpaint_pipeline(sd)
  bundle = clip.from_pretrained(clip_dir)
  text = zero_shot.class_text_features(bundle, bundle.params, CLASSNAMES, ["a photo of {}"], 8)
  logits_fn, cparams = guidance.clip_zero_shot(bundle, text)
  params = dict(params, classifier=cparams)
  prompts = {r["path"]: f"A photo only remain {r['class_name']} number {i}." for i, r in enumerate(recs)}
  return dict(root=root, sd=sd, clip_dir=clip_dir, src=src, recs=recs, pipe=pipe, params=params, bundle=bundle,
              text=np.asarray(text), logits_fn=logits_fn, prompts=prompts)


def _config(**overrides):
  cfg = dict(image_size=IMAGE, steps=20, strength=0.6, guidance_scale=8.0, seed=3, batch_size=BATCH, band=0.05,
             iterations=ITERATIONS, step_size=10.0, target=TARGET, loss="squared", grad_mode="skip",
             log_every_secs=1000,
             max_not_ok=1.0)  # 2 iterations with a narrow band leave these images 'in_distribution'
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _synthesize(world, name, recs, n_devices):
  out_dir = str(world["root"] / name)
  mesh = parallel.make_mesh(devices=jax.devices()[:n_devices])
  manifest = synthesis.synthesize(_config(), out_dir, world["pipe"], world["params"], world["logits_fn"],
                                  world["src"], recs, [world["prompts"][r["path"]] for r in recs], mesh)
  return out_dir, {m["source"]: m for m in manifest}


@pytest.fixture(scope="module")
def runs(world):
  """Three synthesis runs, all batch 8: sources 0-7 on 1 device and on 8 devices, and sources 11..4
  (reversed: sources 4-7 get other neighbours and other batch positions) on 1 device."""
  recs = world["recs"]
  return {"one": _synthesize(world, "one", recs[:BATCH], 1),
          "eight": _synthesize(world, "eight", recs[:BATCH], 8),
          "mixed": _synthesize(world, "mixed", recs[N_SOURCES - BATCH:][::-1], 1)}


def _png(out_dir, rec):
  with Image.open(os.path.join(out_dir, rec["output"])) as im:
    return np.asarray(im, np.int16)


# ---------------------------------------------------------------------------------------------
# 1. The skip gradient dL/dz0 against torch autograd.

def _torch_clip_logits(world, x):
  """transformers CLIPModel zero-shot logits. The tiny CLIP's image_size is 32 and the tiny VAE decodes
  16x16 latents to 32x32, so CLIPImageProcessor's resize (shortest side 32) and crop (32) are the
  identity: preprocessing is normalization only."""
  model = transformers.CLIPModel.from_pretrained(world["clip_dir"]).eval()
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
  f = model.visual_projection(model.vision_model(pixel_values=(x - mean) / std).pooler_output)
  f = f / f.norm(dim=-1, keepdim=True)
  t = torch.tensor(world["text"])
  t = t / t.norm(dim=-1, keepdim=True)
  return 100.0 * f @ t.T


RESNET = dict(layers=(1, 1, 1, 1), width=8, classes=10, resize=36, crop=32)


@pytest.fixture(scope="module")
def tiny_resnet(world):
  model = _random_resnet(RESNET["layers"], RESNET["width"], RESNET["classes"], seed=0)
  path = str(world["root"] / "resnet.pth")
  torch.save(model.state_dict(), path)
  module, params = resnet.load_resnet(path, layers=RESNET["layers"], width=RESNET["width"],
                                      num_classes=RESNET["classes"])
  return model, module, params


@pytest.mark.parametrize("classifier", ["clip", "resnet"])
def test_skip_gradient_matches_torch_autograd(world, tiny_resnet, classifier):
  pipe, params = world["pipe"], world["params"]
  if classifier == "clip":
    fn, cparams = world["logits_fn"], params["classifier"]
    n_classes, torch_logits = C, lambda x: _torch_clip_logits(world, x)
  else:
    torch_model, module, rparams = tiny_resnet
    fn, cparams = guidance.resnet50(module, rparams, resize=RESNET["resize"], crop=RESNET["crop"])
    n_classes = RESNET["classes"]
    torch_logits = lambda x: torch_model(_torch_preprocess(x, RESNET["resize"], RESNET["crop"]))
  m = float(-np.log(n_classes) - 0.3)
  cfg = refinement.RefineConfig(target=m)
  z0 = np.random.default_rng(5).standard_normal((4, LATENT, LATENT, 4)).astype(np.float32)

  def decode_fn(p, z):
    return inpaint.decode_images(pipe.vae_decode, p["vae"], z, pipe.scaling_factor)

  def logits_fn(p, x):
    return fn(p["classifier"], x)

  grad, loss, s = jax.jit(functools.partial(refinement.skip_gradient, cfg, decode_fn, logits_fn))(
      {"vae": params["vae"], "classifier": cparams}, jnp.asarray(z0))
  grad, loss, s = map(np.asarray, (grad, loss, s))

  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(world["sd"], "vae")).eval()
  z = torch.from_numpy(z0.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  x = torch.clamp(vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5, 0, 1)
  g = torch_logits(x)
  s_ref = g.mean(-1) - torch.logsumexp(g, -1)
  loss_ref = (m - s_ref) ** 2
  (grad_ref,) = torch.autograd.grad(loss_ref.sum(), z)
  grad_ref = grad_ref.numpy().transpose(0, 2, 3, 1)
  s_ref, loss_ref = s_ref.detach().numpy(), loss_ref.detach().numpy()

  clamped = float(((x == 0) | (x == 1)).float().mean())
  rel = np.abs(grad - grad_ref).max() / np.abs(grad_ref).max()
  s_err = np.abs(s - s_ref).max()
  loss_rel = np.abs(loss - loss_ref).max() / np.abs(loss_ref).max()
  print(f"\n[{classifier}] C={n_classes} m={m:.4f} s={np.round(s, 4)} (torch {np.round(s_ref, 4)}); "
        f"{clamped:.1%} of pixels clamped; dL/dz0 max|diff|/max|ref| = {rel:.2e} (max|ref| "
        f"{np.abs(grad_ref).max():.3e}); s max abs err {s_err:.2e}; loss rel err {loss_rel:.2e}")
  assert np.abs(grad_ref).max() > 0 and np.isfinite(grad).all()
  assert rel <= 1e-4
  assert s_err <= 1e-4 * max(1.0, np.abs(s_ref).max())
  assert loss_rel <= 1e-4


# ---------------------------------------------------------------------------------------------
# 2. Loss kinds, and one refinement iteration moving s toward m.

def test_loss_kinds_against_hand_formulas():
  logits = np.random.default_rng(0).normal(scale=3.0, size=(6, 7)).astype(np.float64)
  logits[0] = 0.5  # uniform: s = -log C, KL = 0
  n = logits.shape[-1]
  s_hand = logits.mean(-1) - scipy.special.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(np.asarray(refinement.boundary_score(jnp.asarray(logits, jnp.float32))), s_hand,
                             rtol=1e-5, atol=1e-5)
  assert np.all(s_hand <= -np.log(n) + 1e-12)
  # a target inside the range of s, so that both sides of the hinge occur
  m = float(np.median(s_hand[1:]))
  got = {k: np.asarray(refinement.boundary_loss(jnp.asarray(logits, jnp.float32), k, m)) for k in refinement.LOSSES}
  np.testing.assert_allclose(got["squared"], (m - s_hand) ** 2, rtol=1e-5, atol=1e-5)
  # 'hinge' relu(m - s)^2: (m - s)^2 while s is below m (more in-distribution), 0 beyond it.
  hinge = np.where(s_hand < m, (m - s_hand) ** 2, 0.0)
  np.testing.assert_allclose(got["hinge"], hinge, rtol=1e-5, atol=1e-5)
  assert (got["hinge"] == 0).any() and (got["hinge"] > 0).any()
  # 'msp_kl' = KL(uniform || softmax(g)), by scipy (entropy(p, q) = sum p log(p/q)) and by hand.
  probs = scipy.special.softmax(logits, axis=-1)
  kl_scipy = scipy.stats.entropy(np.full_like(probs, 1.0 / n), probs, axis=-1)
  kl_hand = np.sum(scipy.special.rel_entr(1.0 / n, probs), axis=-1)
  np.testing.assert_allclose(kl_scipy, kl_hand, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got["msp_kl"], kl_scipy, rtol=1e-5, atol=1e-5)
  assert abs(got["msp_kl"][0]) < 1e-5 and abs(got["squared"][0] - (m + np.log(n)) ** 2) < 1e-4
  with pytest.raises(ValueError, match="unknown loss"):
    refinement.boundary_loss(jnp.asarray(logits), "l1", m)
  with pytest.raises(ValueError, match="grad_mode"):
    refinement.RefineConfig(grad_mode="approx")


def test_one_iteration_moves_score_toward_target(runs):
  _, manifest = runs["eight"]
  scores = np.array([m["scores"] for m in manifest.values()])  # [B, K]
  losses = np.array([m["losses"] for m in manifest.values()])
  assert scores.shape == losses.shape == (BATCH, ITERATIONS)
  np.testing.assert_allclose(losses, (TARGET - scores) ** 2, rtol=1e-4, atol=1e-6)
  print(f"\nm = {TARGET:.4f} (C = {C})\ns before {np.round(scores[:, 0], 4)}\ns after  {np.round(scores[:, 1], 4)}"
        f"\nloss before {np.round(losses[:, 0], 5)} (mean {losses[:, 0].mean():.5f})"
        f"\nloss after  {np.round(losses[:, 1], 5)} (mean {losses[:, 1].mean():.5f}); "
        f"decreased for {int((losses[:, 1] < losses[:, 0]).sum())}/{BATCH}")
  assert losses[:, 1].mean() < 0.7 * losses[:, 0].mean()
  assert (losses[:, 1] < losses[:, 0]).sum() >= BATCH - 1
  assert (np.abs(TARGET - scores[:, 1]) < np.abs(TARGET - scores[:, 0])).sum() >= BATCH - 1


# ---------------------------------------------------------------------------------------------
# 3-4. Device count and batch composition do not change an image.

def test_eight_devices_equal_one_device(runs, world):
  (dir1, man1), (dir8, man8) = runs["one"], runs["eight"]
  assert list(man1) == list(man8) == [r["path"] for r in world["recs"][:BATCH]]
  worst, worst_score = 0, 0.0
  for src, r1 in man1.items():
    r8 = man8[src]
    for key in ("scores", "losses"):
      np.testing.assert_allclose(r8[key], r1[key], rtol=1e-4, atol=1e-5, err_msg=f"{src} {key}")
    worst_score = max(worst_score, float(np.abs(np.subtract(r8["scores"], r1["scores"])).max()))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("scores", "losses")}
    assert strip(r8) == strip(r1), src
    worst = max(worst, int(np.abs(_png(dir8, r8) - _png(dir1, r1)).max()))
  print(f"\n1 vs 8 devices: max PNG diff {worst} grey levels, max score diff {worst_score:.2e}")
  assert worst <= 1
  # the manifest on disk holds the same records, in source order
  with open(os.path.join(dir8, "manifest.jsonl")) as f:
    assert [json.loads(line) for line in f] == list(man8.values())


def test_batch_composition_does_not_change_an_image(runs, world):
  (dir_a, man_a), (dir_b, man_b) = runs["one"], runs["mixed"]
  shared = [r["path"] for r in world["recs"][N_SOURCES - BATCH:BATCH]]
  assert len(shared) == 4 and all(s in man_a and s in man_b for s in shared)
  pos_a, pos_b = list(man_a), list(man_b)
  assert all(pos_a.index(s) != pos_b.index(s) for s in shared)
  worst = 0
  for src in shared:
    worst = max(worst, int(np.abs(_png(dir_b, man_b[src]) - _png(dir_a, man_a[src])).max()))
    np.testing.assert_allclose(man_b[src]["scores"], man_a[src]["scores"], rtol=1e-4, atol=1e-5)
    assert man_b[src]["source_id"] == man_a[src]["source_id"]
  # other sources give other images (the comparison is not vacuous)
  other = int(np.abs(_png(dir_a, man_a[pos_a[0]]) - _png(dir_a, man_a[pos_a[1]])).max())
  print(f"\nsame source, other neighbours: max PNG diff {worst} grey levels (two different sources: {other})")
  assert worst <= 1 and other > 1


# ---------------------------------------------------------------------------------------------
# 5. Skip (dL/dz0) vs exact (dL/deps through the remat'd sampler) update directions.

def test_exact_vs_skip_gradient(world, runs):
  """Both modes on the batch of the 1-device run, through synthesize_batch as synthesize jits it (the skip
  program is the one that run compiled); the updates are (eps0 - eps_2) / r."""
  pipe, params, recs = world["pipe"], world["params"], world["recs"][:BATCH]
  cfg = _config()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  images = np.stack([synthesis.load_source_image(os.path.join(world["src"], r["path"]), IMAGE) for r in recs])
  ids = np.array([synthesis.source_id(r["path"]) for r in recs], np.int32)
  prompt_ids = np.asarray(pipe.tokenize([world["prompts"][r["path"]] for r in recs]))
  args = (params, *parallel.global_batch((images, ids, prompt_ids), mesh), jnp.asarray(pipe.tokenize([""])),
          synthesis.masked_image_latents(pipe, params["vae"], IMAGE),
          jnp.int32(inpaint.start_index(pipe.scheduler, cfg.steps, cfg.strength)),
          jnp.float32(cfg.guidance_scale), jnp.uint32(cfg.seed))
  # The initial noise, drawn as synthesize_batch draws it: from (seed, source id).
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  eps0 = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, int(i)), (LATENT, LATENT, 4), jnp.float32))
                   for i in ids])
  out = {}
  for mode in refinement.GRAD_MODES:
    rcfg = refinement.RefineConfig(iterations=cfg.iterations, step_size=cfg.step_size, target=cfg.target,
                                   loss=cfg.loss, grad_mode=mode)
    fn = jax.jit(functools.partial(synthesis.synthesize_batch, pipe, rcfg, cfg.steps, None, world["logits_fn"]))
    _, scores, losses, eps, _ = fn(*args)
    out[mode] = dict(update=(eps0 - np.asarray(eps)) / cfg.step_size, scores=np.asarray(scores),
                     losses=np.asarray(losses))
  skip, exact = out["skip"]["update"], out["exact"]["update"]
  # skip mode is what the 1-device synthesis run did
  np.testing.assert_allclose(out["skip"]["scores"].T, [runs["one"][1][r["path"]]["scores"] for r in recs],
                             rtol=1e-5, atol=1e-5)
  # same first iteration (same z0), so the same loss; only the direction of the update differs
  np.testing.assert_allclose(out["exact"]["losses"][0], out["skip"]["losses"][0], rtol=1e-5, atol=1e-6)
  norm = lambda a: float(np.linalg.norm(a))
  cos_all = float(np.vdot(skip, exact)) / (norm(skip) * norm(exact))
  cos_img = [float(np.vdot(a, b)) / (norm(a) * norm(b)) for a, b in zip(skip, exact)]
  print(f"\n|dL/dz0| {norm(skip):.3e}  |dL/deps| {norm(exact):.3e}  |eps0| {norm(eps0):.3e}\n"
        f"cosine(dL/dz0, dL/deps) = {cos_all:.4f} over the batch; per image {np.round(cos_img, 4)}\n"
        f"loss it1 {np.round(out['skip']['losses'][0], 3)}\nloss it2 skip  {np.round(out['skip']['losses'][1], 3)} "
        f"(mean {out['skip']['losses'][1].mean():.3f})\nloss it2 exact {np.round(out['exact']['losses'][1], 3)} "
        f"(mean {out['exact']['losses'][1].mean():.3f})")
  assert np.isfinite(skip).all() and np.isfinite(exact).all()
  assert norm(skip) > 0 and norm(exact) > 0
  assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos_img + [cos_all])
