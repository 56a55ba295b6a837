"""Frozen torchvision ResNet-50 (Bottleneck, v1.5) in Flax, and torchvision's classifier preprocessing.

The classifier `g` of the synthesis loss `s = mean(g(x)) - logsumexp(g(x))`: torchvision's
`resnet50(weights=IMAGENET1K_V2)` in eval mode, with `IMAGENET1K_V2.transforms()` (resize 232 bilinear
antialias, centre crop 224, normalize) done in JAX so that gradients flow to the decoded image.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0/conv2`, `layer1_0/downsample_0`,
`layer1_0/downsample_1`, `fc`) so `checkpoint_io.state_dict_to_params` converts its state dict. BatchNorm
is eval-mode only: `weight` -> `scale`, `bias`, `running_mean`, `running_var` are all stored as params
(the classifier is frozen; take gradients with respect to the input only), `num_batches_tracked` is
dropped, and the four are folded into one multiply-add per channel.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from synood_jax.models import checkpoint_io
from synood_jax.models.checkpoint_io import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_LAYERS = (3, 4, 6, 3)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d default, the one torchvision's ResNet uses


class FrozenBatchNorm(nn.Module):
  """Eval-mode BatchNorm2d: y = (x - running_mean) / sqrt(running_var + eps) * scale + bias."""
  features: int
  eps: float = BN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.features
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("running_mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("running_var", nn.initializers.ones, (c,), jnp.float32)
    # Folded in float32: one multiply-add per channel.
    mul = scale * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _conv(features, kernel, stride, name, dtype):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (expansion 4, stride on the 3x3 conv: ResNet v1.5)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    out = _conv(self.planes, 1, 1, "conv1", d)(x)
    out = nn.relu(FrozenBatchNorm(self.planes, dtype=d, name="bn1")(out))
    out = _conv(self.planes, 3, self.stride, "conv2", d)(out)
    out = nn.relu(FrozenBatchNorm(self.planes, dtype=d, name="bn2")(out))
    out = _conv(self.planes * 4, 1, 1, "conv3", d)(out)
    out = FrozenBatchNorm(self.planes * 4, dtype=d, name="bn3")(out)
    identity = x
    if self.downsample:
      identity = _conv(self.planes * 4, 1, self.stride, "downsample_0", d)(x)
      identity = FrozenBatchNorm(self.planes * 4, dtype=d, name="downsample_1")(identity)
    return nn.relu(out + identity)


class ResNet(nn.Module):
  """torchvision ResNet with Bottleneck blocks; `width` is the stem width (64 for ResNet-50).

  Input: NHWC images already normalized with the ImageNet mean/std (`classifier_preprocess`).
  Output: float32 logits [batch, num_classes].
  """
  layers: Sequence[int] = RESNET50_LAYERS
  width: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    x = x.astype(d)
    x = _conv(self.width, 7, 2, "conv1", d)(x)
    x = nn.relu(FrozenBatchNorm(self.width, dtype=d, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf, as torch
    in_features = self.width
    for i, blocks in enumerate(self.layers):
      planes = self.width * 2 ** i
      stride = 1 if i == 0 else 2
      for j in range(blocks):
        s = stride if j == 0 else 1
        down = j == 0 and (s != 1 or in_features != planes * 4)
        x = Bottleneck(planes, s, down, dtype=d, name=f"layer{i + 1}_{j}")(x)
        in_features = planes * 4
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=d, param_dtype=jnp.float32, name="fc")(x.astype(d))
    return x.astype(jnp.float32)


def _read_state_dict(path: str) -> Mapping[str, np.ndarray]:
  """A torchvision state dict from a `.pth`/`.pt`/`.bin` or a `.safetensors` file (both read lazily, without
  torch) or an HF-style folder."""
  if os.path.isdir(path):
    state, _ = checkpoint_io.load_state_dict(path)
    return state
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    return checkpoint_io.SafetensorsFile(path)  # lazy; bfloat16 widened without torch
  try:
    return checkpoint_io.read_torch_file(path)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{path}: not a readable PyTorch state dict ({e})") from e


def _rename(key: str) -> str | None:
  if key.endswith("num_batches_tracked"):
    return None
  return key


def expected_torch_keys(params_shapes) -> dict[str, tuple]:
  """torch key -> torch shape for every param of a ResNet tree (as params_to_state_dict names them)."""
  flat = checkpoint_io._flatten(params_shapes)  # pylint: disable=protected-access
  out = {}
  for path, leaf in flat.items():
    torch_leaf = "weight" if path[-1] in ("kernel", "scale") else path[-1]
    key = checkpoint_io.flax_module_key(path[:-1]) + "." + torch_leaf
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    out[key] = shape
  return out


def resnet_params_from_state_dict(module: ResNet, state: Mapping[str, np.ndarray], source: str) -> dict:
  """Convert a torchvision ResNet state dict into `module`'s params; errors name `source` and the key."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  expected = shapes["params"]
  want = expected_torch_keys(expected)
  missing = sorted(k for k in want if k not in state)
  if missing:
    raise CheckpointError(f"{source}: missing key(s) {missing[:10]}"
                          + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
                          + f" for ResNet(layers={tuple(module.layers)}, width={module.width}, "
                            f"num_classes={module.num_classes})")
  return checkpoint_io.state_dict_to_params(state, expected, source, rename=_rename,
                                            place=checkpoint_io.to_device)


def config(path: str) -> dict:
  """(layers, width, num_classes) of a torchvision ResNet state dict, read from its tensors' names and
  shapes (torchvision files carry no config)."""
  state = _read_state_dict(path)
  layers, i = [], 1
  while any(k.startswith(f"layer{i}.") for k in state):
    layers.append(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}))
    i += 1
  return {"layers": tuple(layers), "width": int(state["conv1.weight"].shape[0]),
          "num_classes": int(state["fc.weight"].shape[0])}


def load(path: str, dtype: Any = jnp.float32, attention: str = "auto", layers: Sequence[int] = RESNET50_LAYERS,
         width: int = 64, num_classes: int = 1000) -> tuple[ResNet, dict]:
  """Load a torchvision ResNet state dict (`.pth`/`.pt` via `checkpoint_io.read_torch_file`, `.safetensors`).

  `dtype` is the compute dtype (params stay float32; logits are returned as float32); `attention` is
  taken for the models' common face and unused (no attention layers). A missing key, an unexpected key
  or a shape mismatch raises `CheckpointError` naming the file and the key.
  Returns `(module, params)`; call `module.apply({'params': params}, x_nhwc_normalized)`.
  """
  del attention
  module = ResNet(layers=tuple(layers), width=width, num_classes=num_classes, dtype=dtype)
  state = _read_state_dict(path)
  return module, resnet_params_from_state_dict(module, state, path)


def save(path: str, config: Mapping[str, Any], params) -> str:
  """A torchvision state dict as `.safetensors` at `path` (what `load` and torchvision's
  `load_state_dict` read); `config` ({layers, width, num_classes}) is checked against the params."""
  module = ResNet(layers=tuple(config["layers"]), width=int(config["width"]), num_classes=int(config["num_classes"]))
  state = checkpoint_io.params_to_state_dict(jax.device_get(params))
  want = expected_torch_keys(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"])
  if {k: tuple(v.shape) for k, v in state.items()} != want:
    raise CheckpointError(f"{path}: params do not match ResNet({dict(config)})")
  return checkpoint_io.save_state_dict(os.path.dirname(os.path.abspath(path)), state, name=os.path.basename(path))


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision `Resize(size)` with an int: the shorter side becomes `size`, the longer one is truncated."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
  """torchvision `center_crop`: top = int(round((h - crop) / 2.0)), left likewise."""
  if height < crop or width < crop:
    raise ValueError(f"image of size {height}x{width} is smaller than the {crop}x{crop} crop "
                     "(torchvision would pad; not supported)")
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def bilinear_antialias_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 weights of PyTorch's antialiased bilinear resize (align_corners=False).

  As ATen's `_upsample_bilinear2d_aa`: scale = in/out, support = max(scale, 1), a triangle filter of
  that half-width centred at scale*(i+0.5), cut to the pixels [int(c-support+0.5), int(c+support+0.5))
  inside the image, normalized to sum 1. Upsampling is plain bilinear with edge clamping.
  `jax.image.resize(..., 'bilinear', antialias=True)` is the same map; computing it here in float64
  once (static shapes) avoids the ~5e-6 float32 error of its in-graph weight computation.
  """
  scale = in_size / out_size
  support = max(scale, 1.0)
  centre = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
  j = np.arange(in_size, dtype=np.float64)
  lo = np.maximum(np.trunc(centre - support + 0.5), 0)
  hi = np.minimum(np.trunc(centre + support + 0.5), in_size)
  w = np.maximum(0.0, 1.0 - np.abs((j[None, :] - centre[:, None] + 0.5) / support))
  w = np.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), w, 0.0)
  return w / w.sum(axis=1, keepdims=True)


def resize_bilinear_antialias(x, size: tuple[int, int]):
  """Resize NHWC `x` to `size` = (height, width) as F.interpolate(bilinear, antialias=True); differentiable."""
  _, h, w, _ = x.shape
  wh = jnp.asarray(bilinear_antialias_weights(h, size[0]), x.dtype)
  ww = jnp.asarray(bilinear_antialias_weights(w, size[1]), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", wh, x, precision=hi)
  return jnp.einsum("pw,nowc->nopc", ww, x, precision=hi)


def classifier_preprocess(images_nhwc_01, resize: int | None = 232, crop: int | None = 224,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          resize_impl: str = "jax", method: str = "bilinear"):
  """torchvision `ResNet50_Weights.IMAGENET1K_V2.transforms()` on float images in [0, 1], differentiable.

  Resize the shorter side to `resize` with the map of `F.interpolate(mode='bilinear', antialias=True,
  align_corners=False)`, centre crop `crop` with torchvision's offsets, normalize with mean/std.
  `resize_impl`: "jax" = `jax.image.resize(..., 'bilinear', antialias=True)` (float32 weights; on
  512x512 -> 232 it reproduces torch's float32 output to 2.4e-7, elsewhere to ~1e-5, since both round
  their weights in float32), "float64" = `resize_bilinear_antialias` (weights in float64: within 1.5e-7 of
  torch's float64 result). `method` ('bilinear', or 'bicubic' for CLIP-style guidance) applies to
  the "jax" resize only. Input and output NHWC; the input dtype is kept (float32 recommended).
  """
  x = jnp.asarray(images_nhwc_01)
  if x.ndim != 4:
    raise ValueError(f"classifier_preprocess expects NHWC images, got shape {x.shape}")
  n, h, w, c = x.shape
  if resize is not None:
    nh, nw = resized_size(h, w, resize)
    if (nh, nw) != (h, w):
      if resize_impl == "jax":
        x = jax.image.resize(x, (n, nh, nw, c), method=method, antialias=True,
                             precision=jax.lax.Precision.HIGHEST)
      elif resize_impl == "float64":
        x = resize_bilinear_antialias(x, (nh, nw))
      else:
        raise ValueError(f"resize_impl must be 'jax' or 'float64', got {resize_impl!r}")
    h, w = nh, nw
  if crop is not None:
    top, left = center_crop_offsets(h, w, crop)
    x = x[:, top:top + crop, left:left + crop, :]
  mean = jnp.asarray(mean, x.dtype)
  std = jnp.asarray(std, x.dtype)
  return (x - mean) / std
