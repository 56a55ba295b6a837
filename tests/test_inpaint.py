"""The jitted in-painting sampler against diffusers' StableDiffusionInpaintPipeline (tiny random SD-2
in-painting pipeline built in PyTorch, saved with save_pretrained, loaded through our pipeline loader)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from synood_jax import parallel  # noqa: E402
from synood_jax.diffusion import inpaint, inpaint_pipeline, schedulers  # noqa: E402
from synood_jax.demo import tiny_clip as tiny, tiny_sd  # noqa: E402
from test_unet_vae import _perturbed  # noqa: E402  (tests/ is on sys.path)

B, IMAGE, LATENT = 8, 32, 16
STEPS, STRENGTH, GUIDANCE = 20, 0.6, 8.0
PROMPTS = ["A photo only remain a green meadow."] * 4 + ["A photo only remain the sky."] * 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A diffusers SD-2 in-painting pipeline folder with tiny random PyTorch models."""
  root = tmp_path_factory.mktemp("sd")
  torch.manual_seed(0)
  public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
  unet = _perturbed(diffusers.UNet2DConditionModel(**public(tiny_sd.TINY_UNET_CONFIG)), 1)
  vae = _perturbed(diffusers.AutoencoderKL(**public(tiny_sd.TINY_VAE_CONFIG)), 2)
  with torch.no_grad():  # posterior std exp(-15) = 3e-7: diffusers' VAE samples equal the means to 1e-6
    latent = tiny_sd.TINY_VAE_CONFIG["latent_channels"]
    vae.quant_conv.weight[latent:] = 0
    vae.quant_conv.bias[latent:] = -30.0
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_sd.TINY_TEXT_CONFIG)).eval()
  tok_dir = tiny.write_char_tokenizer(str(root / "tok"))
  pipe = diffusers.StableDiffusionInpaintPipeline(
      vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
      scheduler=diffusers.PNDMScheduler.from_config(tiny_sd.SD2_INPAINT_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(str(root / "pipe"))
  return str(root / "pipe"), pipe


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return dict(z_in=rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32),
              eps=rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32),
              masked=rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32) * 0.5)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _torch_latents(pipe, kind, inputs):
  sched_cls = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler}[kind]
  pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
  pipe.scheduler.set_timesteps(STEPS)
  ts, _ = pipe.get_timesteps(STEPS, STRENGTH, "cpu")
  z_t = pipe.scheduler.add_noise(_nchw(inputs["z_in"]), _nchw(inputs["eps"]), ts[:1].repeat(B))
  with torch.no_grad():
    out = pipe(prompt=PROMPTS, image=torch.zeros(B, 3, IMAGE, IMAGE), mask_image=torch.ones(B, 1, IMAGE, IMAGE),
               masked_image_latents=_nchw(inputs["masked"]), latents=z_t, strength=STRENGTH,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
               height=IMAGE, width=IMAGE).images
  return out.numpy().transpose(0, 2, 3, 1)


TRACES = []


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(pipe, steps, params, z_in, eps, ids, neg_ids, masked, first_index, guidance):
  TRACES.append(1)
  cond = pipe.text_hidden(params["text"], ids)
  uncond = jnp.broadcast_to(pipe.text_hidden(params["text"], neg_ids), cond.shape)
  t0 = jnp.asarray(inpaint.timestep_table(pipe.scheduler, steps))[first_index]
  z_t = schedulers.add_noise(pipe.scheduler, z_in, eps, jnp.full((z_in.shape[0],), t0))
  mask = jnp.ones(z_in.shape[:-1] + (1,))
  return inpaint.sample_latents(pipe.unet, pipe.scheduler, params["unet"], z_t, cond, uncond, mask, masked,
                                guidance, steps, first_index)


def _ours(pipe, params, inputs, strength=STRENGTH, guidance=GUIDANCE):
  first = jnp.int32(inpaint.start_index(pipe.scheduler, STEPS, strength))
  return _run(pipe, STEPS, params, inputs["z_in"], inputs["eps"], pipe.tokenize(PROMPTS), pipe.tokenize([""]),
              inputs["masked"], first, jnp.float32(guidance))


@pytest.fixture(scope="module")
def ours_pndm(folder):
  return inpaint_pipeline.load_inpaint_pipeline(folder[0])


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_sampler_matches_diffusers(folder, inputs, ours_pndm, kind):
  pipe, params = ours_pndm if kind == "pndm" else inpaint_pipeline.load_inpaint_pipeline(folder[0], scheduler=kind)
  ref = _torch_latents(folder[1], kind, inputs)
  got = np.asarray(_ours(pipe, params, inputs))
  err = np.abs(got - ref).max()
  print(f"{kind}: max |ours - diffusers| = {err:.2e} (latent scale {np.abs(ref).max():.2f})")
  assert err <= 1e-3


def test_new_guidance_or_strength_does_not_recompile(ours_pndm, inputs):
  pipe, params = ours_pndm
  _ours(pipe, params, inputs)
  before = len(TRACES)
  a = _ours(pipe, params, inputs, guidance=3.0)
  b = _ours(pipe, params, inputs, strength=0.8)
  assert len(TRACES) == before
  assert not np.allclose(a, b)


def test_sharded_equals_one_device(ours_pndm, inputs):
  pipe, params = ours_pndm
  ref = np.asarray(_ours(pipe, params, inputs))
  mesh = parallel.make_mesh(data=2, fsdp=4)
  sharded_params = parallel.shard_params(params, mesh)
  fsdp_leaves = [x for x in jax.tree_util.tree_leaves(sharded_params) if "fsdp" in str(x.sharding.spec)]
  assert fsdp_leaves, "no UNet parameter was FSDP-sharded"
  batch = parallel.global_batch(inputs, mesh)
  first = jnp.int32(inpaint.start_index(pipe.scheduler, STEPS, STRENGTH))
  got = _run(pipe, STEPS, sharded_params, batch["z_in"], batch["eps"], pipe.tokenize(PROMPTS),
             pipe.tokenize([""]), batch["masked"], first, jnp.float32(GUIDANCE))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_bfloat16_networks_float32_scheduler(folder, ours_pndm, inputs):
  pipe16, params16 = inpaint_pipeline.load_inpaint_pipeline(folder[0], dtype=jnp.bfloat16)
  assert jax.tree_util.tree_leaves(params16["unet"])[0].dtype == jnp.bfloat16
  got = np.asarray(_ours(pipe16, params16, inputs))
  ref = np.asarray(_ours(*ours_pndm, inputs))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  rel = np.abs(got - ref).max() / np.abs(ref).max()
  print(f"bf16 networks vs fp32: max rel diff {rel:.3f}")
  assert rel <= 0.1


def test_gradient_through_sampler_and_decoder_under_remat(ours_pndm, inputs):
  pipe, params = ours_pndm
  first = jnp.int32(inpaint.start_index(pipe.scheduler, STEPS, STRENGTH))
  ids, neg = pipe.tokenize(PROMPTS[:2]), pipe.tokenize([""])

  def f(eps):
    cond = pipe.text_hidden(params["text"], ids)
    uncond = jnp.broadcast_to(pipe.text_hidden(params["text"], neg), cond.shape)
    z_t = schedulers.add_noise(pipe.scheduler, inputs["z_in"][:2], eps, jnp.full((2,), 0))
    z0 = inpaint.sample_latents(pipe.unet, pipe.scheduler, params["unet"], z_t, cond, uncond,
                                jnp.ones((2, LATENT, LATENT, 1)), inputs["masked"][:2], 8.0, STEPS, first,
                                remat=True)
    return jnp.mean(inpaint.decode_images(pipe.vae_decode, params["vae"], z0, pipe.scaling_factor, chunk=1))

  eps = jnp.asarray(inputs["eps"][:2])
  value, grad = jax.jit(jax.value_and_grad(f))(eps)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  # directional derivative check against a central difference
  d = jax.random.normal(jax.random.key(0), eps.shape)
  h = 1e-2
  numeric = (f(eps + h * d) - f(eps - h * d)) / (2 * h)
  np.testing.assert_allclose(float(jnp.vdot(grad, d)), float(numeric), rtol=5e-2)


def test_pipeline_folder_errors_name_what_is_missing(tmp_path):
  from synood_jax.models.checkpoint_io import CheckpointError
  with pytest.raises(CheckpointError, match="no model_index.json"):
    inpaint_pipeline.load_inpaint_pipeline(str(tmp_path))
  (tmp_path / "model_index.json").write_text("{}")
  for sub in ("unet", "vae", "text_encoder", "tokenizer"):
    (tmp_path / sub).mkdir()
  with pytest.raises(CheckpointError, match="missing subfolder 'scheduler'"):
    inpaint_pipeline.load_inpaint_pipeline(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# The one call (inpaint_pipeline.inpaint / pipe(...)) against StableDiffusionInpaintPipeline.__call__ end to end.

CALL_PROMPTS = ["A photo only remain a green meadow.", "A photo only remain the sky."]
CALL_NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def call_inputs():
  """Images in [0, 1], masks with soft values (binarized at 0.5), fixed starting latents (NHWC)."""
  rng = np.random.default_rng(3)
  image = rng.uniform(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  mask = np.zeros((2, IMAGE, IMAGE, 1), np.float32)
  mask[0, 4:20, 6:30] = 1.0
  mask[1, 10:] = 0.7
  mask[1, :, :5] = 0.3
  latents = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
  return image, mask, latents


def _diffusers_call(pipe, inputs, output_type):
  image, mask, latents = inputs
  pipe.scheduler = diffusers.PNDMScheduler.from_config(tiny_sd.SD2_INPAINT_SCHEDULER)
  with torch.no_grad():
    out = pipe(prompt=CALL_PROMPTS, negative_prompt=CALL_NEGATIVE, image=image, mask_image=mask,
               latents=_nchw(latents), strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               output_type=output_type, height=IMAGE, width=IMAGE).images
  return out if output_type == "np" else out.numpy().transpose(0, 2, 3, 1)


def _call(pipe, params, inputs, **kwargs):
  image, mask, latents = inputs
  return pipe(params, CALL_PROMPTS, image, mask, CALL_NEGATIVE, strength=STRENGTH, num_inference_steps=STEPS,
              guidance_scale=GUIDANCE, latents=latents, return_latents=True, **kwargs)


def test_one_call_matches_diffusers_pipeline(folder, call_inputs):
  """Images (output_type="np") and latents (output_type="latent") within 1e-4 relative; the compiled
  program lives on the pipeline object, which is freed with it."""
  import gc
  import weakref
  ref_images = _diffusers_call(folder[1], call_inputs, "np")
  ref_latents = _diffusers_call(folder[1], call_inputs, "latent")
  pipe, params = inpaint_pipeline.load_inpaint_pipeline(folder[0])
  images, latents = _call(pipe, params, call_inputs)
  assert images.shape == (2, IMAGE, IMAGE, 3) and images.dtype == jnp.float32
  img_err = np.abs(np.asarray(images) - ref_images).max() / np.abs(ref_images).max()
  lat_err = np.abs(np.asarray(latents) - ref_latents).max() / np.abs(ref_latents).max()
  print(f"one-call inpaint vs diffusers: images {img_err:.2e}, latents {lat_err:.2e} relative")
  assert img_err <= 1e-4 and lat_err <= 1e-4
  # a new seed, guidance or strength < 1 reuses the program (no latents: noise drawn from the seed)
  again = pipe(params, CALL_PROMPTS, call_inputs[0], call_inputs[1], strength=0.8, num_inference_steps=STEPS,
               guidance_scale=3.0, seed=7)
  assert again.shape == images.shape and np.isfinite(np.asarray(again)).all()
  program = pipe._programs["inpaint"]
  assert program._cache_size() == 2  # latents given / drawn
  alive = weakref.ref(pipe)
  del pipe, program
  gc.collect()
  assert alive() is None, "something still holds the pipeline (and its compiled programs)"


def test_one_call_sharded_over_mesh_equals_one_device(folder, call_inputs):
  pipe, params = inpaint_pipeline.load_inpaint_pipeline(folder[0])
  ref_images, ref_latents = _call(pipe, params, call_inputs)
  mesh = parallel.make_mesh(data=2, fsdp=4)
  images, latents = _call(pipe, parallel.shard_params(params, mesh), call_inputs, mesh=mesh)
  assert images.shape == (2, IMAGE, IMAGE, 3)  # padded to 8 rows on the mesh, cut back
  np.testing.assert_allclose(np.asarray(images), np.asarray(ref_images), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(latents), np.asarray(ref_latents), atol=1e-4, rtol=0)


def test_image_and_mask_conventions_match_diffusers_processors(folder):
  """PIL (resized with Lanczos, RGB / grayscale) and arrays ([0, 1] floats, or uint8 / 255) become what
  diffusers' image_processor / mask_processor make of them."""
  from PIL import Image
  from synood_jax.diffusion import images as image_lib
  ref = folder[1]
  rng = np.random.default_rng(4)
  pil = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  pil_mask = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # RGB -> grayscale
  arr = rng.uniform(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  arr_mask = rng.uniform(size=(IMAGE, IMAGE)).astype(np.float32)
  u8 = (arr * 255).round().astype(np.uint8)
  # diffusers would take uint8 arrays as values in [0, 255] (2 x - 1 up to 509); ours divides by 255
  for image, mask, as_float in ((pil, pil_mask, pil), (arr, arr_mask, arr), (u8, arr_mask[..., None], u8 / 255.0)):
    ours_x, ours_m = image_lib.image_and_mask(image, mask, IMAGE, IMAGE, 2)
    want_x = ref.image_processor.preprocess(as_float, height=IMAGE, width=IMAGE).numpy().transpose(0, 2, 3, 1)
    want_m = ref.mask_processor.preprocess(mask, height=IMAGE, width=IMAGE).numpy().transpose(0, 2, 3, 1)
    want_x = np.broadcast_to(want_x, (2,) + want_x.shape[1:]) if len(want_x) == 1 else want_x
    np.testing.assert_allclose(ours_x, want_x, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(ours_m, np.broadcast_to(want_m, ours_m.shape))
  with pytest.raises(ValueError, match=r"image: float pixels must lie in \[0, 1\]"):
    image_lib.image_and_mask(arr * 2 - 1, arr_mask, IMAGE, IMAGE, 2)
  with pytest.raises(ValueError, match="mask_image: array of size 16x16, want 32x32"):
    image_lib.image_and_mask(arr, arr_mask[:16, :16], IMAGE, IMAGE, 2)
  with pytest.raises(ValueError, match="image: 3 images for 2 prompts"):
    image_lib.image_and_mask(np.concatenate([arr, arr[:1]]), arr_mask, IMAGE, IMAGE, 2)


def test_pndm_on_a_folder_saved_with_ddim(folder, tmp_path):
  """load_inpaint_pipeline(folder, scheduler="pndm") on a DDIM folder runs the scheduler diffusers'
  pipeline runs (skip_prk_steps and steps_offset fixed by StableDiffusionInpaintPipeline.__init__)."""
  import os
  import shutil
  src, ref = folder
  dst = tmp_path / "ddim_pipe"
  dst.mkdir()
  for sub in ("unet", "vae", "text_encoder", "tokenizer"):
    os.symlink(os.path.join(src, sub), dst / sub)
  shutil.copy(os.path.join(src, "model_index.json"), dst / "model_index.json")
  ddim = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 clip_sample=False, set_alpha_to_one=False, steps_offset=0)
  ddim.save_config(str(dst / "scheduler"))
  with pytest.raises(schedulers.SchedulerConfigError, match="skip_prk_steps"):
    schedulers.make_scheduler(schedulers.load_scheduler_config(str(dst)), "pndm")
  pipe, _ = inpaint_pipeline.load_inpaint_pipeline(str(dst), scheduler="pndm")
  components = {k: v for k, v in ref.components.items() if k != "scheduler"}
  ref_pipe = diffusers.StableDiffusionInpaintPipeline(
      **components, scheduler=diffusers.PNDMScheduler.from_config(ddim.config), requires_safety_checker=False)
  for key, value in pipe.scheduler.config.items():
    assert ref_pipe.scheduler.config[key] == value, key
  ref_pipe.scheduler.set_timesteps(STEPS)
  np.testing.assert_array_equal(schedulers.set_timesteps(pipe.scheduler, STEPS), ref_pipe.scheduler.timesteps)
  over, _ = inpaint_pipeline.load_inpaint_pipeline(str(dst), scheduler="pndm",
                                           scheduler_overrides={"timestep_spacing": "trailing"})
  assert over.scheduler == schedulers.make_scheduler(ddim.config, "pndm", skip_prk_steps=True, steps_offset=1,
                                                     timestep_spacing="trailing")
  with pytest.raises(schedulers.SchedulerConfigError, match="the override"):
    inpaint_pipeline.load_inpaint_pipeline(str(dst), scheduler="pndm", scheduler_overrides={"skip_prk_steps": False})
