"""Synthesis stage (SynOOD stage 1): the boundary-refinement gradient against PyTorch autograd, the loss
kinds against hand formulas, the whole refinement loop against a PyTorch implementation of the official
procedure (DDIM and PNDM, iteration by iteration), and end-to-end synthesis on a tiny SD-2 in-painting
pipeline (one vs eight devices, batch composition, skip vs exact gradient, output formats, refusing
outputs of another procedure)."""
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

from synood_jax.demo import image_sets as demo_data
from synood_jax.synthesis import guidance, procedure, programs, refinement, sources, synthesize as synthesis
from synood_jax import parallel
from synood_jax.models import zero_shot  # noqa: E402
from synood_jax.diffusion import inpaint, inpaint_pipeline  # noqa: E402
from synood_jax.models import clip, resnet
from synood_jax.demo import tiny_clip as tiny, tiny_sd  # noqa: E402
from synood_jax.testing.torch_reference import official_loop, random_resnet, torch_preprocess  # noqa: E402

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
  recs = list(sources.select_sources(src, per_class=N_SOURCES // 2).records)
  assert len(recs) == N_SOURCES
  pipe, params = inpaint_pipeline.load_inpaint_pipeline(sd)
  bundle = clip.from_pretrained(clip_dir)
  text = zero_shot.class_text_features(bundle, bundle.params, CLASSNAMES, ["a photo of {}"], 8)
  logits_fn, cparams = guidance.clip_zero_shot(bundle, text)
  params = dict(params, classifier=cparams)
  prompts = {r.path: f"A photo only remain {r.class_name} number {i}." for i, r in enumerate(recs)}
  return dict(root=root, sd=sd, clip_dir=clip_dir, src=src, recs=recs, pipe=pipe, params=params, bundle=bundle,
              text=np.asarray(text), logits_fn=logits_fn, prompts=prompts)


def _config(**overrides):
  cfg = dict(image_size=IMAGE, steps=20, strength=0.6, guidance_scale=8.0, seed=3, batch_size=BATCH, band=0.05,
             iterations=ITERATIONS, step_size=55.0, target=TARGET, loss="squared", grad_mode="skip",
             reference_batch=1, image_format="png", log_every_secs=1000)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _synthesize(world, name, recs, n_devices):
  out_dir = str(world["root"] / name)
  mesh = parallel.make_mesh(devices=jax.devices()[:n_devices])
  manifest = synthesis.synthesize(_config(), out_dir, world["pipe"], world["params"], world["logits_fn"],
                                  world["src"], recs, [world["prompts"][r.path] for r in recs], mesh)
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
# 1. The skip gradient dL/du (u = z0 / scaling_factor, the decoder's input) against torch autograd.

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
  model = random_resnet(RESNET["layers"], RESNET["width"], RESNET["classes"], seed=0)
  path = str(world["root"] / "resnet.pth")
  torch.save(model.state_dict(), path)
  module, params = resnet.load(path, layers=RESNET["layers"], width=RESNET["width"],
                                      num_classes=RESNET["classes"])
  return model, module, params


@pytest.mark.parametrize("classifier,chunk,devices", [("clip", 0, 1), ("resnet", 0, 1), ("clip", 2, 2)])
def test_skip_gradient_matches_torch_autograd(world, tiny_resnet, classifier, chunk, devices):
  """dL/du against torch autograd; also taken 2 rows at a time (decode_chunk) on a batch split over 2
  devices, the layout that keeps the decoder's gradient within memory at large batches."""
  pipe, params = world["pipe"], world["params"]
  if classifier == "clip":
    fn, cparams = world["logits_fn"], params["classifier"]
    n_classes, torch_logits = C, lambda x: _torch_clip_logits(world, x)
  else:
    torch_model, module, rparams = tiny_resnet
    fn, cparams = guidance.resnet50(module, rparams, resize=RESNET["resize"], crop=RESNET["crop"])
    n_classes = RESNET["classes"]
    torch_logits = lambda x: torch_model(torch_preprocess(x, RESNET["resize"], RESNET["crop"]))
  m = float(-np.log(n_classes) - 0.3)
  cfg, hyper = refinement.RefineConfig(decode_chunk=chunk), refinement.Hyper.make(target=m)
  z0 = np.random.default_rng(5).standard_normal((4, LATENT, LATENT, 4)).astype(np.float32)

  def decode_fn(p, u):
    return inpaint.decode_unscaled(pipe.vae_decode, p["vae"], u)

  def logits_fn(p, x):
    return fn(p["classifier"], x)

  u0 = inpaint.decoder_input(jnp.asarray(z0), pipe.scaling_factor)
  u0 = jax.device_put(u0, parallel.batch_sharding(parallel.make_mesh(devices=jax.devices()[:devices]), 4))
  grad, loss, s = jax.jit(functools.partial(refinement.skip_gradient, cfg, hyper, decode_fn, logits_fn))(
      {"vae": params["vae"], "classifier": cparams}, u0)
  grad, loss, s = map(np.asarray, (grad, loss, s))

  # the official script: the leaf is the decoder's input z / scaling_factor
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(world["sd"], "vae")).eval()
  z = (torch.from_numpy(z0.transpose(0, 3, 1, 2).copy()) / vae.config.scaling_factor).requires_grad_(True)
  x = torch.clamp(vae.decode(z).sample / 2 + 0.5, 0, 1)
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
  print(f"\n[{classifier}, chunk {chunk}, {devices} devices] C={n_classes} m={m:.4f} s={np.round(s, 4)} (torch {np.round(s_ref, 4)}); "
        f"{clamped:.1%} of pixels clamped; dL/du max|diff|/max|ref| = {rel:.2e} (max|ref| "
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
  assert list(man1) == list(man8) == [r.path for r in world["recs"][:BATCH]]
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
  shared = [r.path for r in world["recs"][N_SOURCES - BATCH:BATCH]]
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
# 5. Skip (dL/du) vs exact (dL/du pulled back through the remat'd sampler) updates.

def _batch_args(world, recs, cfg, mesh):
  """The arguments of `programs.BatchProgram` for these sources, built as `synthesize` builds them
  (fresh source images each time: the program donates them)."""
  pipe = world["pipe"]
  params = parallel.place_params(world["params"], mesh)
  images = np.stack([synthesis.load_source_image(os.path.join(world["src"], r.path), IMAGE) for r in recs])
  ids = np.array([synthesis.source_id(r.path) for r in recs], np.int32)
  prompt_ids = np.asarray(pipe.tokenize([world["prompts"][r.path] for r in recs]))
  return (params, *parallel.global_batch((images, ids, prompt_ids), mesh), jnp.asarray(pipe.tokenize([""])),
          programs.masked_image_latents(pipe, params["vae"], IMAGE),
          np.int32(inpaint.start_index(pipe.scheduler, cfg.steps, cfg.strength)),
          np.float32(cfg.guidance_scale),
          refinement.Hyper.make(cfg.step_size, cfg.target, cfg.reference_batch), np.uint32(cfg.seed))


def test_exact_vs_skip_gradient(world, runs):
  """Both modes on the batch of the 1-device run, through `BatchProgram` as synthesize builds it (the
  skip program is the one that run compiled); the updates are (eps0 - eps_2) / r. The exact update is
  (dz0/deps)^T dL/du = scaling_factor * dL/deps: checked against a central difference of the loss."""
  pipe, recs = world["pipe"], world["recs"][:BATCH]
  cfg = _config()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  ids = np.array([synthesis.source_id(r.path) for r in recs], np.int32)
  # The initial noise, drawn as synthesize_batch draws it: from (seed, source id).
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  eps0 = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, int(i)), (LATENT, LATENT, 4), jnp.float32))
                   for i in ids])
  out = {}
  for mode in refinement.GRAD_MODES:
    rcfg = refinement.RefineConfig(iterations=cfg.iterations, loss=cfg.loss, grad_mode=mode)
    args = _batch_args(world, recs, cfg, mesh)
    fn = programs.BatchProgram(pipe, rcfg, cfg.steps, world["logits_fn"], mesh,
                                 parallel.param_shardings(world["params"], mesh))
    _, scores, losses, eps, _ = fn(*args)
    out[mode] = dict(update=(eps0 - np.asarray(eps)) / cfg.step_size, scores=np.asarray(scores),
                     losses=np.asarray(losses))
  skip, exact = out["skip"]["update"], out["exact"]["update"]
  # skip mode is what the 1-device synthesis run did
  np.testing.assert_allclose(out["skip"]["scores"].T, [runs["one"][1][r.path]["scores"] for r in recs],
                             rtol=1e-5, atol=1e-5)
  # same first iteration (same z0), so the same loss; only the direction of the update differs
  np.testing.assert_allclose(out["exact"]["losses"][0], out["skip"]["losses"][0], rtol=1e-5, atol=1e-6)

  # The exact update against a central difference of the summed loss along a random direction d:
  # <dL/deps, d> = <exact, d> / scaling_factor.
  params_, images, ids, prompt_ids, negative_ids, masked, first, guidance, hyper, seed = _batch_args(
      world, recs, cfg, mesh)
  one = refinement.RefineConfig(iterations=1, loss=cfg.loss)

  @jax.jit
  def loss_fn(eps, params_, images, ids, prompt_ids, negative_ids, masked, first, guidance, hyper, seed):
    z_in, _ = programs.draw_inputs(pipe, params_["vae"], images, ids, seed)
    _, _, losses, _, _ = programs.refine_batch(pipe, one, cfg.steps, world["logits_fn"], params_, z_in, eps,
                                                prompt_ids, negative_ids, masked, first, guidance, hyper)
    return jnp.sum(losses)

  total_loss = lambda eps: loss_fn(eps, params_, images, ids, prompt_ids, negative_ids, masked, first, guidance,
                                   hyper, seed)

  d = np.random.default_rng(7).standard_normal(eps0.shape).astype(np.float32)
  h = 1e-2
  numeric = (float(total_loss(eps0 + h * d)) - float(total_loss(eps0 - h * d))) / (2 * h)
  analytic = float(np.vdot(exact, d)) / pipe.scaling_factor
  norm = lambda a: float(np.linalg.norm(a))
  cos_all = float(np.vdot(skip, exact)) / (norm(skip) * norm(exact))
  cos_img = [float(np.vdot(a, b)) / (norm(a) * norm(b)) for a, b in zip(skip, exact)]
  print(f"\n|dL/du| {norm(skip):.3e}  |(dz0/deps)^T dL/du| {norm(exact):.3e}  |eps0| {norm(eps0):.3e}\n"
        f"cosine(skip, exact) = {cos_all:.4f} over the batch; per image {np.round(cos_img, 4)}\n"
        f"<exact, d> / scaling_factor = {analytic:.5f}; central difference of L along d = {numeric:.5f}\n"
        f"loss it1 {np.round(out['skip']['losses'][0], 3)}\nloss it2 skip  {np.round(out['skip']['losses'][1], 3)} "
        f"(mean {out['skip']['losses'][1].mean():.3f})\nloss it2 exact {np.round(out['exact']['losses'][1], 3)} "
        f"(mean {out['exact']['losses'][1].mean():.3f})")
  assert np.isfinite(skip).all() and np.isfinite(exact).all()
  assert norm(skip) > 0 and norm(exact) > 0
  assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos_img + [cos_all])
  np.testing.assert_allclose(analytic, numeric, rtol=5e-2)


def test_batch_program_equals_one_program_and_reuses_its_executables(world):
  """`BatchProgram` (four jitted programs on a host loop, compiled ahead) gives what `synthesize_batch`
  gives traced as one program, for K = 3 with both updates; other r and m run the same executables (no
  trace) and give other results."""
  pipe, recs = world["pipe"], world["recs"][:BATCH]
  cfg = _config(iterations=3)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  traces = []

  def counted(p, x):  # runs once per trace of a program that classifies
    traces.append(1)
    return world["logits_fn"](p, x)

  rcfg = refinement.RefineConfig(iterations=3)
  shardings = parallel.param_shardings(world["params"], mesh)
  whole = jax.jit(functools.partial(programs.synthesize_batch, pipe, rcfg, cfg.steps, counted))
  expected = [np.asarray(x) for x in whole(*_batch_args(world, recs, cfg, mesh))]
  program = programs.BatchProgram(pipe, rcfg, cfg.steps, counted, mesh, shardings)
  program = program.compile(*_batch_args(world, recs, cfg, mesh))
  assert set(program.compile_seconds) == {"lower_s", "xla_s"}
  got = [np.asarray(x) for x in program(*_batch_args(world, recs, cfg, mesh))]
  names = ("images", "scores", "losses", "eps", "steps_finite")
  for name, a, b in zip(names, got, expected):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  assert np.abs(expected[1][-1] - expected[1][0]).max() > 1e-4  # the updates moved the scores
  n = len(traces)
  args = list(_batch_args(world, recs, cfg, mesh))
  args[-2] = refinement.Hyper.make(2 * cfg.step_size, cfg.target - 1.0, cfg.reference_batch)
  other = [np.asarray(x) for x in program(*args)]
  assert len(traces) == n, "a new r / m traced a program again"
  assert not np.allclose(other[3], got[3])


# ---------------------------------------------------------------------------------------------
# 6. The whole refinement loop against the official procedure, iteration by iteration.

# The official setting at the tiny pipeline's size. The ResNet-50 transforms keep their form (resize the
# shorter side, centre crop, normalize) at the 32 px decode's scale: resize 36, crop 32. With resize 232 /
# crop 224 the 32 px images are upsampled 7x, so many more ReLU units sit near zero, and the official
# loop's own update changes by up to 1.9e-4 in norm when its decoder input moves by float noise (2e-6
# relative; measured); at 36 / 32 that floor is about 1e-6, so a 1e-4 comparison means something.
OFFICIAL = dict(batch=2, iterations=3, step_size=10.0, target=-5.0, classes=1000, resize=36, crop=32)


@pytest.fixture(scope="module")
def official_world(world):
  """The tiny SD folder in diffusers, a tiny 1000-class torchvision-layout ResNet, and the injected tensors:
  z_in sampled from the torch VAE posterior of two sources, eps, and the masked-image latents."""
  b = OFFICIAL["batch"]
  torch.manual_seed(0)
  pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(world["sd"], safety_checker=None,
                                                                   requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  model = random_resnet(RESNET["layers"], RESNET["width"], OFFICIAL["classes"], seed=1)
  path = str(world["root"] / "resnet1000.pth")
  torch.save(model.state_dict(), path)
  module, rparams = resnet.load(path, layers=RESNET["layers"], width=RESNET["width"],
                                       num_classes=OFFICIAL["classes"])
  recs = world["recs"][:b]
  sources_nhwc = np.stack([synthesis.load_source_image(os.path.join(world["src"], r.path), IMAGE) for r in recs])
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    z_in = pipe.vae.encode(_t(sources_nhwc)).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
    eps = torch.randn(z_in.shape, generator=gen)
  ours_pipe, ours_params = world["pipe"], world["params"]
  masked = np.asarray(programs.masked_image_latents(ours_pipe, ours_params["vae"], IMAGE))
  masked = np.broadcast_to(masked, (b,) + masked.shape[1:]).copy()
  prompts = [world["prompts"][r.path] for r in recs]
  logits_fn, _ = guidance.resnet50(module, rparams, resize=OFFICIAL["resize"], crop=OFFICIAL["crop"])
  traces = []

  def counted_logits_fn(p, x):  # runs once per trace of a program (per iteration in it)
    traces.append(1)
    return logits_fn(p, x)

  return dict(pipe=pipe, model=model, module=module, rparams=rparams, z_in=z_in, eps=eps, masked=masked,
              prompts=prompts, logits_fn=counted_logits_fn, traces=traces)


def _t(x_nhwc):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))


def _n(t_nchw):
  return t_nchw.detach().numpy().transpose(0, 2, 3, 1)


def official_vs_ours(world, ow, kind):
  """Runs the official loop (free, which is also the teacher sequence) and ours teacher-forced
  (K = 2 from each official eps_i: the first update and score) and free-running (K iterations).
  Returns the per-iteration rows and the free-run scores of both sides."""
  import diffusers as d
  tpipe = ow["pipe"]
  tpipe.scheduler = {"pndm": d.PNDMScheduler, "ddim": d.DDIMScheduler}[kind].from_config(tpipe.scheduler.config)
  pipe, params = (world["pipe"], world["params"]) if kind == "pndm" else \
      inpaint_pipeline.load_inpaint_pipeline(world["sd"], scheduler=kind)
  K, r, m, b = OFFICIAL["iterations"], OFFICIAL["step_size"], OFFICIAL["target"], OFFICIAL["batch"]
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # the official loop amplifies float noise; one thread keeps it reproducible
  try:
    ref = official_loop(tpipe, ow["model"], ow["z_in"], ow["eps"], _t(ow["masked"]), ow["prompts"], K, r, m,
                        resize=OFFICIAL["resize"], crop=OFFICIAL["crop"])
  finally:
    torch.set_num_threads(threads)
  params = dict(params, classifier=ow["rparams"])
  first = jnp.int32(inpaint.start_index(pipe.scheduler, 20, 0.6))
  prompt_ids, neg = jnp.asarray(pipe.tokenize(ow["prompts"])), jnp.asarray(pipe.tokenize([""]))
  z_in, masked = jnp.asarray(_n(ow["z_in"])), jnp.asarray(ow["masked"])

  def ours(iterations, eps):
    fn = _refine_fn(pipe, refinement.RefineConfig(iterations=iterations), ow["logits_fn"])
    _, scores, _, eps_out, _ = fn(params, z_in, jnp.asarray(eps), prompt_ids, neg, masked, first, jnp.float32(8.0),
                               refinement.Hyper.make(r, m, b))
    return np.asarray(scores), np.asarray(eps_out)

  rows = []
  for i, it in enumerate(ref):
    eps_i = _n(it["eps"])
    scores, eps_out = ours(2, eps_i)
    upd, upd_ref = eps_i - eps_out, _n(it["update"])
    ratio = np.linalg.norm(upd.reshape(b, -1), axis=1) / np.linalg.norm(upd_ref.reshape(b, -1), axis=1)
    cos = np.sum(upd.reshape(b, -1) * upd_ref.reshape(b, -1), 1) / (
        np.linalg.norm(upd.reshape(b, -1), axis=1) * np.linalg.norm(upd_ref.reshape(b, -1), axis=1))
    s_ref = it["scores"].numpy()
    rows.append(dict(iteration=i + 1, ratio=ratio, one_minus_cos=1 - cos, scores=scores[0], scores_ref=s_ref,
                     score_rel=np.abs(scores[0] - s_ref) / np.abs(s_ref)))
  free, _ = ours(K, _n(ow["eps"]))
  free_ref = np.stack([it["scores"].numpy() for it in ref])
  return rows, free, free_ref


@functools.lru_cache(maxsize=None)
def _refine_fn(pipe, cfg, logits_fn):
  return jax.jit(functools.partial(programs.refine_batch, pipe, cfg, 20, logits_fn))


def format_rows(kind, rows, free, free_ref) -> str:
  lines = [f"{kind}: iteration | |ours|/|official| update (per image) | 1 - cos | s ours | s official | s rel err"]
  for r in rows:
    lines.append(f"  {r['iteration']} | {' '.join(f'{v:.6f}' for v in r['ratio'])} | "
                 f"{' '.join(f'{v:.1e}' for v in r['one_minus_cos'])} | {' '.join(f'{v:.5f}' for v in r['scores'])} | "
                 f"{' '.join(f'{v:.5f}' for v in r['scores_ref'])} | {r['score_rel'].max():.1e}")
  err = np.abs(free - free_ref) / np.abs(free_ref)
  lines.append(f"  free run: s ours {np.round(free, 5).tolist()} official {np.round(free_ref, 5).tolist()}; "
               f"max rel err {err.max():.1e}")
  return "\n".join(lines)


@pytest.mark.parametrize("kind", ["ddim", "pndm"])
def test_refinement_equals_official_procedure(world, official_world, kind):
  """Same z_in, eps and masked latents on both sides, reference_batch = the official batch. Teacher
  forcing: each iteration starts both sides from the official eps; the update ours/official has ratio
  1 and direction 1 within 1e-4, the scores agree to 1e-4 relative; the free run's scores to 1e-3."""
  rows, free, free_ref = official_vs_ours(world, official_world, kind)
  print("\n" + format_rows(kind, rows, free, free_ref))
  for r in rows:
    assert np.all(np.abs(r["ratio"] - 1) <= 1e-4), r
    assert np.all(r["one_minus_cos"] <= 1e-4), r
    assert np.all(r["score_rel"] <= 1e-4), r
  # the comparison is not vacuous: the updates move the scores
  assert np.abs(free_ref[-1] - free_ref[0]).max() > 1e-3
  np.testing.assert_allclose(free, free_ref, rtol=1e-3)


def test_new_step_size_target_or_reference_batch_reuse_the_program(world, official_world):
  """r, m and the reference batch are traced: other values run the same compiled program (no trace)
  and give other results."""
  pipe, params = world["pipe"], dict(world["params"], classifier=official_world["rparams"])
  fn = _refine_fn(pipe, refinement.RefineConfig(iterations=2), official_world["logits_fn"])
  z = lambda x: jnp.asarray(_n(x))
  args = (params, z(official_world["z_in"]), z(official_world["eps"]), jnp.asarray(pipe.tokenize(official_world["prompts"])),
          jnp.asarray(pipe.tokenize([""])), jnp.asarray(official_world["masked"]),
          jnp.int32(inpaint.start_index(pipe.scheduler, 20, 0.6)), jnp.float32(8.0))
  first = fn(*args, refinement.Hyper.make(10.0, -5.0, 2))
  traces = len(official_world["traces"])
  others = [fn(*args, refinement.Hyper.make(*h)) for h in ((30.0, -5.0, 2), (10.0, -7.0, 2), (10.0, -5.0, 1))]
  assert len(official_world["traces"]) == traces
  for other in others:
    assert not np.allclose(np.asarray(other[3]), np.asarray(first[3]))
  # the update is linear in r / reference_batch: r = 30 moves eps 3x as far as r = 10, batch 1 2x
  eps0 = np.asarray(args[2])
  step = lambda out: eps0 - np.asarray(out[3])
  np.testing.assert_allclose(step(others[0]), 3 * step(first), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(step(others[2]), 2 * step(first), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="reference_batch must be >= 1"):
    refinement.Hyper.make(reference_batch=0)


def test_decoder_input_with_latent_statistics():
  """The official script's branch for VAEs whose config has latents_mean / latents_std."""
  z = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
  mean, std = (0.1, -0.2, 0.3, 0.0), (0.5, 1.5, 2.0, 1.0)
  got = np.asarray(inpaint.decoder_input(jnp.asarray(z), 0.5, mean, std))
  np.testing.assert_allclose(got, z * np.asarray(std) / 0.5 + np.asarray(mean), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(inpaint.decoder_input(jnp.asarray(z), 0.5)), z / 0.5, rtol=1e-6)
  from synood_jax.models import vae as vae_lib
  cfg = vae_lib.VAEConfig.from_dict(dict(vae_lib.TINY_VAE_CONFIG, latents_mean=list(mean), latents_std=list(std)))
  assert cfg.latents_mean == mean and cfg.latents_std == std
  with pytest.raises(ValueError, match="latents_std has 3 values"):
    vae_lib.VAEConfig.from_dict(dict(vae_lib.TINY_VAE_CONFIG, latents_mean=list(mean), latents_std=[1, 2, 3]),
                                source="vae/config.json")


# ---------------------------------------------------------------------------------------------
# 7. Output formats, and outputs of another procedure are refused, never resumed.

def test_jpeg_outputs_and_another_procedure_is_refused(world, runs):
  """JPEG outputs are PIL's quality-75 encoding of the pixels the PNG run wrote; a rerun with another
  output-determining field, or a folder from before procedure versions, is refused with the reason."""
  import io
  import shutil
  recs = world["recs"][:BATCH]
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  prompts = [world["prompts"][r.path] for r in recs]
  out_dir = str(world["root"] / "jpeg")
  run = lambda cfg, d=out_dir: synthesis.synthesize(cfg, d, world["pipe"], world["params"], world["logits_fn"],
                                                    world["src"], recs, prompts, mesh)
  made = run(_config(image_format="jpeg"))
  png_dir, png_man = runs["one"]
  for m in made:
    assert m["output"].endswith("_ood.JPEG")
    buf = io.BytesIO()
    Image.fromarray(_png(png_dir, png_man[m["source"]]).astype(np.uint8)).save(buf, format="JPEG", quality=75)
    with open(os.path.join(out_dir, m["output"]), "rb") as f:
      assert f.read() == buf.getvalue(), m["output"]
  with open(os.path.join(out_dir, "procedure.json")) as f:
    recorded = json.load(f)
  assert recorded["version"] == procedure.PROCEDURE_VERSION and recorded["config"]["image_format"] == "jpeg"
  assert run(_config(image_format="jpeg")) == made  # same procedure: resumed (nothing left to do)
  with pytest.raises(procedure.StaleSynthesisError, match=r"jpeg.*config.synthesis.step_size: 55.0 -> 10.0"):
    run(_config(image_format="jpeg", step_size=10.0))
  old = str(world["root"] / "old_version")
  shutil.copytree(out_dir, old)
  os.remove(os.path.join(old, "procedure.json"))
  with pytest.raises(procedure.StaleSynthesisError, match=r"old_version: manifest.jsonl lists images but there is "
                                                          r"no procedure.json"):
    run(_config(image_format="jpeg"), old)
  recorded["version"] = 1
  with open(os.path.join(old, "procedure.json"), "w") as f:
    json.dump(recorded, f)
  with pytest.raises(procedure.StaleSynthesisError, match=rf"version: 1 -> {procedure.PROCEDURE_VERSION}"):
    run(_config(image_format="jpeg"), old)


# ---------------------------------------------------------------------------------------------
# The settings and the params the programs take (issue 20's two bugs).

class _SpyProgram:
  """Stands in for `programs.BatchProgram` in `synthesize`: records what the programs would be built and
  called with, and returns a plausible outcome (distinct textured images, scores at the target) at once."""
  seen = {}

  def __init__(self, pipe, refine_cfg, steps, logits_fn, mesh, param_shardings):
    self.k = refine_cfg.iterations
    self.seen.update(refine=refine_cfg, shardings=param_shardings)

  def __call__(self, params, images, ids, prompt_ids, negative_ids, masked, first_index, guidance_scale, hyper,
               seed):
    self.seen.update(params=params, hyper=hyper)
    b = images.shape[0]
    pixels = np.random.default_rng(0).uniform(0, 1, (b, IMAGE, IMAGE, 3)).astype(np.float32)
    scores = np.full((self.k, b), TARGET, np.float32)
    return pixels, scores, np.zeros((self.k, b), np.float32), None, np.ones((b,), bool)


def test_custom_sharding_rules_reach_the_programs_without_a_second_copy(world, tmp_path, monkeypatch):
  """Params sharded by custom rules on a (data 2, fsdp 4) mesh of 8 CPU devices: the programs are built
  with exactly those shardings and called with the very same arrays. Before: `synthesize.place_params`
  recomputed shardings by the default rules and device_put a second copy of every leaf they moved."""
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
  rules = ((r"unet/.*kernel", "replicate"), (r"vae/.*", "replicate"), (r".*", "fsdp"))
  given = parallel.shard_params(world["params"], mesh, rules)
  assert parallel.shardings_of(given) != parallel.param_shardings(given, mesh)  # the rules do differ
  monkeypatch.setattr(programs, "BatchProgram", _SpyProgram)
  recs = world["recs"][:BATCH]
  synthesis.synthesize(_config(), str(tmp_path / "out"), world["pipe"], given, world["logits_fn"], world["src"],
                       recs, [world["prompts"][r.path] for r in recs], mesh)
  seen = _SpyProgram.seen
  assert seen["shardings"] == parallel.shardings_of(given)
  used, mine = jax.tree_util.tree_leaves(seen["params"]), jax.tree_util.tree_leaves(given)
  assert len(used) == len(mine) and all(a is b for a, b in zip(used, mine))


def test_a_partial_config_gets_the_papers_procedure(world, tmp_path, monkeypatch):
  """config.synthesis without image_format and reference_batch: the paper's values (JPEG, batch 2, from
  `config.base_config()`), recorded in procedure.json. Before: PNG and reference_batch 1 (fallbacks of
  synthesize.py's own)."""
  from synood_jax import config as config_lib
  paper = config_lib.base_config().synthesis
  partial = _config()
  del partial["image_format"], partial["reference_batch"]
  settings = synthesis.Settings.from_config(partial)
  assert (settings.image_format, settings.reference_batch) == (paper.image_format, paper.reference_batch)
  assert (settings.image_format, settings.reference_batch) == ("jpeg", 2)
  monkeypatch.setattr(programs, "BatchProgram", _SpyProgram)
  recs = world["recs"][:BATCH]
  out = str(tmp_path / "out")
  made = synthesis.synthesize(partial, out, world["pipe"], world["params"], world["logits_fn"], world["src"], recs,
                              [world["prompts"][r.path] for r in recs], parallel.make_mesh(devices=jax.devices()[:1]))
  assert made and all(m["output"].endswith("_ood.JPEG") for m in made)
  assert float(_SpyProgram.seen["hyper"].reference_batch) == 2.0
  recorded = json.loads(open(os.path.join(out, "procedure.json")).read())["config"]
  assert (recorded["image_format"], recorded["reference_batch"], recorded["jpeg_quality"]) == ("jpeg", 2, 75)
  bad = _config(image_format="gif")
  with pytest.raises(ValueError, match="image_format: 'gif'"):
    synthesis.synthesize(bad, out, world["pipe"], world["params"], world["logits_fn"], world["src"], recs, [], None)
