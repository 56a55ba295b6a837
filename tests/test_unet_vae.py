"""Flax UNet2DConditionModel / AutoencoderKL against diffusers' PyTorch modules on tiny random models."""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from synood_jax.models import checkpoint_io  # noqa: E402
from synood_jax.models import diffusion_layers, unet, vae  # noqa: E402

REL_TOL = 1e-4   # fp32: max |ours - torch| <= REL_TOL * max |torch|
BF16_TOL = 5e-2  # bf16 compute: max |bf16 - fp32| <= BF16_TOL * max |fp32|

# SD1-shaped second config: conv projections, int attention_head_dim, upcast, other time embedding,
# two transformer layers per attention.
UNET_B_CONFIG = {
    "sample_size": 9, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
    "cross_attention_dim": 32, "use_linear_projection": False, "upcast_attention": True,
    "norm_num_groups": 8, "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1,
    "transformer_layers_per_block": 2,
}


def _public(config):
  return {k: v for k, v in config.items() if not k.startswith("_")}


def _perturbed(model, seed):
  """diffusers initialises some weights to constants; add noise so every parameter matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, ref, tol=REL_TOL):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert np.isfinite(ours).all() and err <= tol * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


def _unet_case(tmp_path_factory, name, config, hw, timesteps, seed):
  folder = str(tmp_path_factory.mktemp(name))
  torch.manual_seed(seed)
  model = _perturbed(diffusers.UNet2DConditionModel(**_public(config)), seed)
  model.save_pretrained(folder)
  module, params = unet.load(folder)
  rs = np.random.RandomState(seed)
  x = rs.randn(2, hw, hw, config["in_channels"]).astype(np.float32)
  ctx = rs.randn(2, 7, config["cross_attention_dim"]).astype(np.float32)
  with torch.no_grad():
    t = torch.tensor(timesteps, dtype=torch.float32)
    ref = _nhwc(model(_nchw(x), t, torch.from_numpy(ctx)).sample)
  fn = jax.jit(module.apply)
  return dict(folder=folder, torch=model, module=module, params=params, x=x, ctx=ctx, t=timesteps,
              ref=ref, fn=fn, out=np.asarray(fn({"params": params}, x, jnp.asarray(timesteps), ctx)))


@pytest.fixture(scope="module")
def unet_a(tmp_path_factory):
  """TINY_UNET_CONFIG (9-channel inpainting, linear projections), per-example timesteps."""
  return _unet_case(tmp_path_factory, "unet_a", unet.TINY_UNET_CONFIG, 16, np.array([3.0, 741.0], np.float32), 0)


@pytest.fixture(scope="module")
def unet_b(tmp_path_factory):
  """9x9 latents exercise the odd-size upsampling path; scalar timestep."""
  return _unet_case(tmp_path_factory, "unet_b", UNET_B_CONFIG, 9, np.float32(250.0), 1)


@pytest.mark.parametrize("case", ["unet_a", "unet_b"])
def test_unet_matches_diffusers(case, request):
  c = request.getfixturevalue(case)
  _assert_close(c["out"], c["ref"])


def test_unet_bin_folder_loads_same_params(unet_a, tmp_path):
  unet_a["torch"].save_pretrained(str(tmp_path), safe_serialization=False)
  assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
  _, params = unet.load(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, unet_a["params"])


def test_unet_save_pretrained_round_trips_into_diffusers(unet_a, tmp_path):
  unet.save(str(tmp_path), unet.TINY_UNET_CONFIG, unet_a["params"])
  back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path))
  want = unet_a["torch"].state_dict()
  got = back.state_dict()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)


def test_unet_init_params_loads_in_diffusers_and_agrees(unet_a, tmp_path):
  """Random params made without torch: diffusers reads them and computes what we compute."""
  params = unet.init_params(unet.TINY_UNET_CONFIG, jax.random.PRNGKey(3))
  rs = np.random.RandomState(4)  # biases start at 0: perturb them too
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * rs.randn(*p.shape).astype(np.float32), params)
  unet.save(str(tmp_path), unet.TINY_UNET_CONFIG, params)
  model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  a = unet_a
  with torch.no_grad():
    ref = _nhwc(model(_nchw(a["x"]), torch.from_numpy(a["t"]), torch.from_numpy(a["ctx"])).sample)
  _assert_close(a["fn"]({"params": params}, a["x"], a["t"], a["ctx"]), ref)  # same shapes: no recompile


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]),
    ("class_embed_type", "timestep"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("resnet_time_scale_shift", "scale_shift"),
])
def test_unet_unsupported_config_names_key(key, value, tmp_path):
  config = {**unet.TINY_UNET_CONFIG, key: value}
  with pytest.raises(ValueError, match=key):
    unet.build(config)
  checkpoint_io.write_config(str(tmp_path), config)
  with pytest.raises(ValueError, match="config.json.*" + key):
    unet.load(str(tmp_path))


def test_unet_bfloat16_close_to_float32(unet_a):
  module, params = unet.load(unet_a["folder"], dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
  out = jax.jit(module.apply)({"params": params}, unet_a["x"], unet_a["t"], unet_a["ctx"])
  assert out.dtype == jnp.bfloat16
  _assert_close(out, unet_a["out"], BF16_TOL)


def test_nearest_resize_matches_torch():
  x = np.random.RandomState(0).randn(1, 5, 3, 2).astype(np.float32)
  for size in [(9, 7), (10, 6), (5, 5), (11, 13)]:
    ref = _nhwc(torch.nn.functional.interpolate(_nchw(x), size=size, mode="nearest"))
    np.testing.assert_array_equal(np.asarray(diffusion_layers.nearest_resize(jnp.asarray(x), size)), ref)


# ---------------------------------------------------------------------------------------------
# VAE.

@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("vae"))
  torch.manual_seed(5)
  model = _perturbed(diffusers.AutoencoderKL(**_public(vae.TINY_VAE_CONFIG)), 5)
  model.save_pretrained(folder)
  module, params = vae.load(folder)
  img = np.random.RandomState(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(_nchw(img)).latent_dist
    dec = model.decode(dist.mean).sample
  enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
  latents = _nhwc(dist.mean)
  return dict(folder=folder, torch=model, module=module, params=params, img=img, enc=enc, dec=decode,
              mean=latents, logvar=_nhwc(dist.logvar), decoded=_nhwc(dec), latents=latents,
              our_decoded=np.asarray(decode(params, latents)))


def test_vae_encode_matches_diffusers(vae_case):
  mean, logvar = vae_case["enc"](vae_case["params"], vae_case["img"])
  assert mean.shape == (2, 16, 16, 4)
  _assert_close(mean, vae_case["mean"])
  _assert_close(logvar, vae_case["logvar"])


def test_vae_decode_matches_diffusers(vae_case):
  _assert_close(vae_case["our_decoded"], vae_case["decoded"])


def test_vae_sample_and_scaling_factor(vae_case):
  m = vae_case["module"]
  assert m.scaling_factor == vae.TINY_VAE_CONFIG["scaling_factor"]
  assert vae.scale_factor(vae.TINY_VAE_CONFIG) == 2
  mean, logvar = jnp.asarray(vae_case["mean"]), jnp.asarray(vae_case["logvar"])
  rng = jax.random.PRNGKey(0)
  z = vae.vae_sample(mean, logvar, rng)
  eps = jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(z, mean + np.exp(0.5 * np.asarray(logvar)) * eps, rtol=1e-6, atol=1e-6)


def test_vae_old_attention_names_load(vae_case, tmp_path):
  """SD 1.x-era VAEs store the mid attention as query/key/value/proj_attn."""
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for k, v in vae_case["torch"].state_dict().items():
    for new, was in old.items():
      k = k.replace(f".{new}.", f".{was}.")
    state[k] = v.numpy()
  assert any(".proj_attn." in k for k in state)
  checkpoint_io.save_state_dict(str(tmp_path), state, name="diffusion_pytorch_model.safetensors")
  checkpoint_io.write_config(str(tmp_path), vae.TINY_VAE_CONFIG)
  _, params = vae.load(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, vae_case["params"])


def test_vae_bin_folder_and_save_round_trip(vae_case, tmp_path):
  bin_dir, out_dir = str(tmp_path / "bin"), str(tmp_path / "ours")
  vae_case["torch"].save_pretrained(bin_dir, safe_serialization=False)
  _, params = vae.load(bin_dir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, vae_case["params"])
  vae.save(out_dir, vae.TINY_VAE_CONFIG, params)
  back = diffusers.AutoencoderKL.from_pretrained(out_dir).state_dict()
  want = vae_case["torch"].state_dict()
  assert set(back) == set(want)
  for k in want:
    np.testing.assert_array_equal(back[k].numpy(), want[k].numpy(), err_msg=k)


def test_vae_init_params_loads_in_diffusers(tmp_path):
  params = vae.init_params(vae.TINY_VAE_CONFIG, jax.random.PRNGKey(0))
  vae.save(str(tmp_path), vae.TINY_VAE_CONFIG, params)
  model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path))
  w = model.state_dict()["decoder.conv_out.weight"].numpy()
  np.testing.assert_array_equal(w, np.asarray(params["decoder"]["conv_out"]["kernel"]).transpose(3, 2, 0, 1))


def _group_norm_f64(x, groups, eps):
  """torch.nn.GroupNorm's definition in float64 numpy, NHWC."""
  xd = x.astype(np.float64).reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  mean = xd.mean((1, 2, 4), keepdims=True)
  var = np.square(xd - mean).mean((1, 2, 4), keepdims=True)
  return ((xd - mean) / np.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize("shape,groups", [((2, 64, 64, 128), 32), ((1, 16, 16, 64), 8)])
def test_group_norm_statistics_match_float64(shape, groups):
  """Random activations and per-channel-constant ones (what the first GroupNorm of an all-zero image
  sees): one XLA reduce over (H, W, C/G) was 1.1e-5 off on the constant input at 64x64x128."""
  rng = np.random.default_rng(0)
  rand = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
  const = np.broadcast_to((rng.normal(size=shape[-1]) * 0.3 + 0.1).astype(np.float32), shape).copy()
  norm = diffusion_layers.GroupNorm(groups, 1e-6)
  params = {"scale": jnp.ones(shape[-1]), "bias": jnp.zeros(shape[-1])}
  fn = jax.jit(lambda x: norm.apply({"params": params}, x))
  for name, x, tol in (("random", rand, 2e-6), ("constant", const, 1e-6)):
    err = np.abs(np.asarray(fn(x)) - _group_norm_f64(x, groups, 1e-6)).max()
    with torch.no_grad():
      t = torch.nn.functional.group_norm(_nchw(x), groups, eps=1e-6)
    t_err = np.abs(_nhwc(t) - _group_norm_f64(x, groups, 1e-6)).max()
    print(f"GroupNorm {shape} {name}: ours {err:.2e}, torch fp32 {t_err:.2e} from float64")
    assert err <= tol, (name, err)


def test_vae_encode_all_zero_image_matches_float64(vae_case):
  """SynOOD's masked image is all zeros: our float32 encode within 3e-6 (relative to the latent scale) of
  diffusers' AutoencoderKL run in float64 (one-reduce GroupNorm statistics gave 7.4e-6)."""
  zeros = np.zeros((2, 32, 32, 3), np.float32)
  model64 = copy.deepcopy(vae_case["torch"]).double()
  with torch.no_grad():
    ref = _nhwc(model64.encode(_nchw(zeros).double()).latent_dist.mean)
    fp32 = _nhwc(vae_case["torch"].encode(_nchw(zeros)).latent_dist.mean)
  mean, _ = vae_case["enc"](vae_case["params"], zeros)
  scale = np.abs(ref).max()
  err, t_err = np.abs(np.asarray(mean, np.float64) - ref).max() / scale, np.abs(fp32 - ref).max() / scale
  print(f"all-zero VAE encode vs float64: ours {err:.2e}, torch fp32 {t_err:.2e} (relative)")
  assert err <= 3e-6


def test_vae_unsupported_config_names_key():
  with pytest.raises(ValueError, match="up_block_types"):
    vae.build({**vae.TINY_VAE_CONFIG, "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]})


def test_vae_bfloat16_decode_close_to_float32(vae_case):
  module, params = vae.load(vae_case["folder"], dtype=jnp.bfloat16)
  out = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, vae_case["latents"])
  assert out.dtype == jnp.bfloat16
  _assert_close(out, vae_case["our_decoded"], BF16_TOL)


def test_sd_shaped_four_level_layouts_load(tmp_path):
  """SD 1.x/2.x block layout (4 levels, 2 layers, DownBlock2D last) and SD VAE layout, narrow channels:
  every diffusers weight finds its Flax param with the right shape (load raises otherwise)."""
  u = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 16,
       "attention_head_dim": [1, 2, 4, 4], "norm_num_groups": 8, "use_linear_projection": True,
       "in_channels": 9}
  v = {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 2, "norm_num_groups": 8,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
  diffusers.UNet2DConditionModel(**u).save_pretrained(str(tmp_path / "u"))
  diffusers.AutoencoderKL(**v).save_pretrained(str(tmp_path / "v"))
  unet.load(str(tmp_path / "u"))
  vae.load(str(tmp_path / "v"))
