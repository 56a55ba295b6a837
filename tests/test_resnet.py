"""ResNet-50 loader and classifier preprocessing against PyTorch references.

torchvision is not installed (it breaks beside this torch), so the reference is a plain-torch copy of
torchvision's Bottleneck ResNet whose state-dict keys are exactly torchvision's.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from synood_jax.models.checkpoint_io import CheckpointError
from synood_jax.models import resnet
from synood_jax.testing.torch_reference import TorchResNet, random_resnet, torch_preprocess

# Known torchvision resnet50 keys (from torchvision's published state dict), spot-checked below.
TORCHVISION_KEYS = ["conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight",
                    "layer1.0.downsample.1.running_mean", "layer2.3.conv3.weight", "layer3.5.bn2.bias",
                    "layer4.2.bn3.weight", "fc.weight", "fc.bias"]


@pytest.fixture(scope="module", params=["tiny", "full"])
def case(request, tmp_path_factory):
  if request.param == "tiny":
    layers, width, classes, size, batch = (1, 1, 1, 1), 8, 10, 64, 2
  else:
    layers, width, classes, size, batch = (3, 4, 6, 3), 64, 1000, 64, 1
  model = random_resnet(layers, width, classes, seed=0)
  folder = tmp_path_factory.mktemp(request.param)
  sd = model.state_dict()
  torch.save(sd, folder / "resnet.pth")
  save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "resnet.safetensors"))
  os.makedirs(folder / "hf")  # an HF-style folder holding model.safetensors
  save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "hf" / "model.safetensors"))
  x = torch.from_numpy(np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(np.float32))
  with torch.no_grad():
    ref = model(x).numpy()
  return dict(name=request.param, layers=layers, width=width, classes=classes, folder=folder, sd=sd, x=x,
              ref=ref)


def test_state_dict_keys_are_torchvision():
  model = TorchResNet()
  assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's ResNet50_Weights num_params
  keys = set(model.state_dict())
  assert len(keys) == 320  # torchvision resnet50: 53 conv + 53 BN x 5 (incl. num_batches_tracked) + fc x 2
  for k in TORCHVISION_KEYS:
    assert k in keys


@pytest.mark.parametrize("ext", ["pth", "safetensors", "folder"])
def test_logits_match_torch(case, ext):
  if ext == "folder" and case["name"] != "tiny":
    pytest.skip("one model is enough")
  path = case["folder"] / ("hf" if ext == "folder" else f"resnet.{ext}")
  module, params = resnet.load(str(path), layers=case["layers"], width=case["width"],
                                      num_classes=case["classes"])
  x = jnp.asarray(case["x"].numpy().transpose(0, 2, 3, 1))
  out = np.asarray(jax.jit(module.apply)({"params": params}, x))
  ref = case["ref"]
  assert out.shape == ref.shape and out.dtype == np.float32
  rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
  print(f"{case['name']} {ext}: max|ref|={np.max(np.abs(ref)):.3g} rel err {rel:.2e}")
  assert rel < 1e-4
  assert np.argmax(out, -1).tolist() == np.argmax(ref, -1).tolist()


def test_bfloat16_compute(case):
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  module, params = resnet.load(str(case["folder"] / "resnet.safetensors"), layers=case["layers"],
                                      width=case["width"], num_classes=case["classes"], dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = np.asarray(module.apply({"params": params}, jnp.asarray(case["x"].numpy().transpose(0, 2, 3, 1))))
  assert out.dtype == np.float32
  rel = np.max(np.abs(out - case["ref"])) / np.max(np.abs(case["ref"]))
  print(f"bfloat16 compute: rel err {rel:.2e}")
  assert rel < 5e-2


def test_score_gradient_matches_torch(case):
  """d s / d image for s = mean(g) - logsumexp(g) through preprocessing and the classifier (SynOOD's loss)."""
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  model = random_resnet(case["layers"], case["width"], case["classes"], seed=0)
  img = np.random.default_rng(3).uniform(size=(1, 3, 256, 256)).astype(np.float32)
  xt = torch.from_numpy(img).requires_grad_(True)
  g = model(torch_preprocess(xt))
  s = (g.mean(-1) - torch.logsumexp(g, -1)).sum()
  s.backward()
  ref_s, ref_grad = s.item(), xt.grad.numpy().transpose(0, 2, 3, 1)
  module, params = resnet.load(str(case["folder"] / "resnet.pth"), layers=case["layers"],
                                      width=case["width"], num_classes=case["classes"])

  def score(x):
    logits = module.apply({"params": params}, resnet.classifier_preprocess(x))
    return jnp.sum(jnp.mean(logits, -1) - jax.nn.logsumexp(logits, -1))

  val, grad = jax.jit(jax.value_and_grad(score))(jnp.asarray(img.transpose(0, 2, 3, 1)))
  rel = np.max(np.abs(np.asarray(grad) - ref_grad)) / np.max(np.abs(ref_grad))
  print(f"score {float(val):.6f} vs torch {ref_s:.6f}; gradient rel err {rel:.2e}")
  assert abs(float(val) - ref_s) < 1e-4 * max(1.0, abs(ref_s))
  assert rel < 1e-3


def test_missing_key_names_file_and_key(case, tmp_path):
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  sd = dict(case["sd"])
  del sd["layer2.0.downsample.1.running_var"]
  path = tmp_path / "missing.pth"
  torch.save(sd, path)
  with pytest.raises(CheckpointError, match=r"missing\.pth.*layer2\.0\.downsample\.1\.running_var"):
    resnet.load(str(path), layers=case["layers"], width=case["width"], num_classes=case["classes"])


def test_shape_mismatch_names_file_and_key(case, tmp_path):
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  sd = {k: v.contiguous() for k, v in case["sd"].items()}
  path = tmp_path / "bad.safetensors"
  save_file(sd, str(path))
  # Same file, wrong class count: fc is (10, 256) / (10,) but the model asks for 1000 classes.
  with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'fc\.(weight|bias)'.*\(10(, 256)?,?\)"):
    resnet.load(str(path), layers=case["layers"], width=case["width"], num_classes=1000)
  sd["layer1.0.conv2.weight"] = torch.zeros(8, 8, 5, 5)
  save_file(sd, str(path))
  with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'layer1\.0\.conv2\.weight'"):
    resnet.load(str(path), layers=case["layers"], width=case["width"], num_classes=case["classes"])


def test_unexpected_key_and_missing_file(tmp_path, case):
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  sd = dict(case["sd"])
  sd["layer9.0.conv1.weight"] = torch.zeros(1)
  path = tmp_path / "extra.pth"
  torch.save(sd, path)
  with pytest.raises(CheckpointError, match=r"extra\.pth.*layer9\.0\.conv1\.weight"):
    resnet.load(str(path), layers=case["layers"], width=case["width"], num_classes=case["classes"])
  with pytest.raises(CheckpointError, match="nope.pth"):
    resnet.load(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------------
# Preprocessing: torchvision IMAGENET1K_V2 transforms on float tensors = interpolate(bilinear,
# antialias=True, align_corners=False) of the shorter side to 232, centre crop 224, normalize.

# Measured on [0, 1] float32 inputs: jax.image.resize(bilinear, antialias) and F.interpolate(bilinear,
# antialias=True, align_corners=False) are the same linear map (in float64 they agree to 1e-13). In float32
# both round their weights: jax.image.resize vs torch float32 is 2.4e-7 on 512x512 -> 232 (SynOOD's case),
# up to 8e-6 elsewhere; each is up to 1.6e-5 from the float64 result. resize_bilinear_antialias (float64
# weights) is within 1.6e-7 of torch float64.
ATOL_VS_FLOAT64 = 1e-6
ATOL_VS_TORCH_FLOAT32 = 3e-5


def test_resize_matches_torch_interpolate_antialias():
  rng = np.random.default_rng(0)
  # downsample (SynOOD's 512x512 decode), non-integer downsample, upsample, non-square both ways
  for shape, size in [((512, 512), (232, 232)), ((300, 411), (232, 317)), ((100, 120), (232, 278)),
                      ((64, 48), (20, 15))]:
    x = rng.uniform(size=(2, 3) + shape)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
    ours = np.asarray(resnet.resize_bilinear_antialias(xj, size)).transpose(0, 3, 1, 2)
    jax_rs = jax.image.resize(xj, (2,) + size + (3,), "bilinear", antialias=True,
                              precision=jax.lax.Precision.HIGHEST)
    jax_rs = np.asarray(jax_rs).transpose(0, 3, 1, 2)
    ref64, ref32 = (F.interpolate(torch.from_numpy(x).to(dt), size=size, mode="bilinear", antialias=True,
                                  align_corners=False).double().numpy() for dt in (torch.float64, torch.float32))
    err = {"ours-t64": np.max(np.abs(ours - ref64)), "ours-t32": np.max(np.abs(ours - ref32)),
           "t32-t64": np.max(np.abs(ref32 - ref64)), "jaxresize-t64": np.max(np.abs(jax_rs - ref64))}
    print(f"resize {shape}->{size}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    assert err["ours-t64"] < ATOL_VS_FLOAT64
    assert err["ours-t32"] < ATOL_VS_TORCH_FLOAT32
    err["jaxresize-t32"] = np.max(np.abs(jax_rs - ref32))
    print(f"  jaxresize-t32 {err['jaxresize-t32']:.2e}")
    assert err["jaxresize-t64"] < ATOL_VS_TORCH_FLOAT32  # same map as jax.image.resize, up to its rounding
    assert err["jaxresize-t32"] < (1e-6 if shape == (512, 512) else ATOL_VS_TORCH_FLOAT32)
    np.testing.assert_allclose(resnet.bilinear_antialias_weights(shape[0], size[0]).sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(512, 512), (333, 500)])
@pytest.mark.parametrize("impl", ["jax", "float64"])
def test_classifier_preprocess_matches_torch(shape, impl):
  x = np.random.default_rng(2).uniform(size=(2, 3) + shape)
  fn = jax.jit(lambda im: resnet.classifier_preprocess(im, resize_impl=impl))
  out = np.asarray(fn(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)))
  assert out.shape == (2, 224, 224, 3)
  out = out.transpose(0, 3, 1, 2)
  for dtype in (torch.float64, torch.float32):
    ref = torch_preprocess(torch.from_numpy(x).to(dtype)).double().numpy()
    err = np.max(np.abs(out - ref))
    print(f"preprocess {impl} {shape} vs torch {dtype}: max abs err {err:.2e} (normalized units)")
    tight = (impl == "float64") == (dtype == torch.float64) and (impl == "float64" or shape == (512, 512))
    assert err < (1e-6 if tight else ATOL_VS_TORCH_FLOAT32) / min(resnet.IMAGENET_STD)


def test_preprocess_helpers_and_gradient():
  assert resnet.resized_size(375, 500, 232) == (232, 309)
  assert resnet.resized_size(500, 375, 232) == (309, 232)
  assert resnet.center_crop_offsets(232, 309, 224) == (4, 42)  # round(42.5) -> 42 (banker's), as torchvision
  x = jnp.full((1, 64, 64, 3), 0.5)
  g = jax.grad(lambda im: resnet.classifier_preprocess(im, resize=40, crop=32).sum())(x)
  assert g.shape == x.shape and float(jnp.abs(g).sum()) > 0


def test_config_save_load_round_trip(case, tmp_path):
  """The models' common face: `config` reads (layers, width, classes) off the state dict, `save` writes
  a torchvision .safetensors that `load` and torch's `load_state_dict` read back unchanged."""
  if case["name"] != "tiny":
    pytest.skip("one model is enough")
  path = str(case["folder"] / "resnet.pth")
  cfg = resnet.config(path)
  assert cfg == {"layers": case["layers"], "width": case["width"], "num_classes": case["classes"]}
  module, params = resnet.load(path, **cfg)
  out = resnet.save(str(tmp_path / "again.safetensors"), cfg, params)
  again = resnet.load(out, **resnet.config(out))[1]
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model = random_resnet(case["layers"], case["width"], case["classes"], seed=1)
  from safetensors.torch import load_file
  model.load_state_dict(load_file(out), strict=False)  # num_batches_tracked is not saved
  with torch.no_grad():
    np.testing.assert_allclose(model(case["x"]).numpy(), case["ref"], rtol=1e-5, atol=1e-5)
  with pytest.raises(CheckpointError, match="do not match"):
    resnet.save(str(tmp_path / "bad.safetensors"), {**cfg, "num_classes": 3}, params)


def test_every_model_module_has_the_same_face():
  """config(folder), load(folder, dtype, attention) -> (module, params), save(folder, config, params)."""
  import inspect
  from synood_jax.models import clip, unet, vae
  for m in (clip, unet, vae, resnet):
    assert list(inspect.signature(m.load).parameters)[:3] == ["folder" if m is not resnet else "path", "dtype",
                                                               "attention"], m.__name__
    assert list(inspect.signature(m.save).parameters)[:3] in (["folder", "config", "params"],
                                                              ["path", "config", "params"]), m.__name__
    assert list(inspect.signature(m.config).parameters)[:1] in (["folder"], ["path"]), m.__name__
