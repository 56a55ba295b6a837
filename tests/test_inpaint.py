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
from synood_jax.diffusion import inpaint, pipeline, schedulers  # noqa: E402
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
  return pipeline.load_inpaint_pipeline(folder[0])


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_sampler_matches_diffusers(folder, inputs, ours_pndm, kind):
  pipe, params = ours_pndm if kind == "pndm" else pipeline.load_inpaint_pipeline(folder[0], scheduler=kind)
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
  pipe16, params16 = pipeline.load_inpaint_pipeline(folder[0], dtype=jnp.bfloat16)
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
    pipeline.load_inpaint_pipeline(str(tmp_path))
  (tmp_path / "model_index.json").write_text("{}")
  for sub in ("unet", "vae", "text_encoder", "tokenizer"):
    (tmp_path / sub).mkdir()
  with pytest.raises(CheckpointError, match="missing subfolder 'scheduler'"):
    pipeline.load_inpaint_pipeline(str(tmp_path))
