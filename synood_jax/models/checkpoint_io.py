"""Read and write Hugging Face / diffusers checkpoint folders as Flax param trees.

One converter serves every model (CLIP, UNet, VAE, ResNet): Flax modules are named after the
PyTorch modules, with a list index joined by "_" (torch `layers.3.fc1` is Flax `layers_3/fc1`). The
leaf name and layout come from the Flax tree we expect: `kernel` (linear: transposed, conv: OIHW ->
HWIO), `scale` (norm weight), `embedding`, or a raw parameter kept as it is.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from synood_jax import fileio
from synood_jax.models import torch_pickle

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.bin")


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be read as asked; the message names the file and key."""


def read_config(folder: str, name: str = "config.json") -> dict:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no {name} in checkpoint folder {folder!r}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def write_config(folder: str, config: Mapping[str, Any], name: str = "config.json") -> None:
  fileio.write_json(os.path.join(folder, name), dict(config), indent=2, sort_keys=True)


def weight_files(folder: str) -> list[str]:
  """The weight files of a folder: one known name, or every shard named by an index file."""
  for index_name in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                     "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json"):
    index = os.path.join(folder, index_name)
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(folder, s) for s in shards]
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return [os.path.join(folder, name)]
  raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_FILES)} and shard indexes)")


def load_state_dict(folder: str) -> tuple[Mapping[str, np.ndarray], str]:
  """PyTorch state dict of a folder, and the file(s) it came from. Lazy: each tensor is read from its
  file (as float32 numpy if floating) only when asked for, so a converter that places one leaf at a
  time never holds the whole checkpoint on the host."""
  files = weight_files(folder)
  parts: list[Mapping[str, np.ndarray]] = []
  for path in files:
    parts.append(SafetensorsFile(path) if path.endswith(".safetensors") else _TorchFile(path))
  return LazyStateDict(parts), ", ".join(files)


class LazyStateDict(Mapping):
  """Keys of several weight files (a later file wins a repeated key); values read on access."""

  def __init__(self, parts: Iterable[Mapping[str, np.ndarray]]):
    self._where = {k: part for part in parts for k in part}

  def __getitem__(self, key: str) -> np.ndarray:
    return self._where[key][key]

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


# safetensors dtype names -> numpy (bfloat16 is widened to float32 by hand: numpy has no bfloat16).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class SafetensorsFile(Mapping):
  """The tensors of one .safetensors file, each read with a plain file read when asked for (no mmap:
  mapped pages would count against the process until the whole file had been touched).

  Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
  the raw little-endian data. Floating tensors come back as float32, others as stored.
  """

  def __init__(self, path: str):
    try:
      with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    for key, info in header.items():
      if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    self.path, self._start, self._header = path, 8 + n, header

  def __getitem__(self, key: str) -> np.ndarray:
    info = self._header[key]
    begin, end = info["data_offsets"]
    out = np.empty(info["shape"], _SAFETENSORS_DTYPES[info["dtype"]])
    if out.nbytes != end - begin:
      raise CheckpointError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {info['shape']} "
                            f"{info['dtype']}")
    with open(self.path, "rb") as f:
      f.seek(self._start + begin)
      if f.readinto(memoryview(out.reshape(-1)).cast("B")) != out.nbytes:
        raise CheckpointError(f"{self.path}: truncated at tensor {key!r}")
    return torch_pickle.to_float32(out, bfloat16=info["dtype"] == "BF16")

  def __iter__(self):
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


class _TorchFile(Mapping):
  """A torch pickle (.bin / .pth): read without torch by `torch_pickle` (lazy, like `SafetensorsFile`);
  a file that reader does not take (a legacy non-zip pickle, a global outside a state dict's) goes to
  torch.load(weights_only=True) when torch is installed. Non-tensor values are left out either way."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._sd = torch_pickle.TorchPickleFile(path)
    except torch_pickle.UnsupportedPickle as e:
      self._sd = _torch_state_dict(path, why=str(e))
    except torch_pickle.TorchPickleError as e:
      raise CheckpointError(str(e)) from e

  def __getitem__(self, key: str) -> np.ndarray:
    if isinstance(self._sd, torch_pickle.TorchPickleFile):
      try:
        return self._sd[key]
      except torch_pickle.TorchPickleError as e:
        raise CheckpointError(str(e)) from e
    return _tensor_to_numpy(self._sd[key])

  def __iter__(self):
    return iter(self._sd)

  def __len__(self) -> int:
    return len(self._sd)


def read_torch_file(path: str) -> Mapping[str, np.ndarray]:
  """The lazy state dict of one .pth / .bin file (see `_TorchFile`)."""
  return _TorchFile(path)


def _torch_state_dict(path: str, why: str = ""):
  """A state dict read by torch itself; `why` (naming the file) says why the torch-free reader passed
  the file on."""
  head = f"{why}; " if why else f"{path}: "
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{head}reading this file needs torch (pip install torch), "
                          "or convert it to float32 safetensors") from e
  try:
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
      sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (unpickling errors come as many types)
    raise CheckpointError(f"{head}torch.load(weights_only=True) failed{' too' if why else ''} "
                          f"({type(e).__name__}: {e})") from e
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise CheckpointError(f"{path}: top-level object is a {type(sd).__name__}, not a state dict")
  return {k: v for k, v in sd.items() if torch.is_tensor(v)}  # as torch_pickle: non-tensors left out


def _tensor_to_numpy(v) -> np.ndarray:
  return v.detach().float().numpy() if v.is_floating_point() else v.numpy()


def save_state_dict(folder: str, state: Mapping[str, np.ndarray], name: str = "model.safetensors") -> str:
  from safetensors.numpy import save
  path = os.path.join(folder, name)
  # np.asarray(order="C"), not ascontiguousarray: the latter turns 0-d (logit_scale) into shape (1,)
  fileio.atomic_write(path, save({k: np.asarray(v, order="C") for k, v in state.items()}, metadata={"format": "pt"}))
  return path


# ---------------------------------------------------------------------------------------------
# Name and layout conversion.

_INDEX = re.compile(r"^\d+$")
_FLAX_INDEXED = re.compile(r"^(.+)_(\d+)$")


def torch_module_path(key: str) -> tuple[str, ...]:
  """`a.layers.3.fc1.weight` -> ('a', 'layers_3', 'fc1', 'weight')."""
  out: list[str] = []
  for part in key.split("."):
    if _INDEX.match(part) and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def flax_module_key(path: Iterable[str], literal: frozenset[str] = frozenset()) -> str:
  """Inverse of `torch_module_path` for module names; names in `literal` keep their '_N'."""
  parts = []
  for p in path:
    m = _FLAX_INDEXED.match(p)
    if m and p not in literal:
      parts.append(f"{m.group(1)}.{m.group(2)}")
    else:
      parts.append(p)
  return ".".join(parts)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  return value


_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")


def to_device(path: tuple, x: np.ndarray) -> jax.Array:
  """`state_dict_to_params`'s `place` that puts each leaf on the default device as it is converted.
  jax.device_put, not jnp.asarray: the latter compiles a small program per distinct leaf shape (16 ms
  each on CPU, seconds for a UNet)."""
  del path
  return jax.device_put(x)


def state_dict_to_params(state: Mapping[str, np.ndarray], expected: Mapping, source: str,
                         rename: Callable[[str], str | None] = lambda k: k,
                         place: Callable[[tuple, np.ndarray], Any] = lambda path, x: x) -> dict:
  """Convert a PyTorch state dict to the Flax param tree whose shapes `expected` gives.

  `rename(torch_key)` maps a key to the torch-style key of our module tree, or None to drop it
  (buffers such as position ids). Missing keys, extra keys and shape mismatches raise a
  `CheckpointError` naming `source`, the key and the shapes. Leaf by leaf, each converted array goes
  to `place(flax_path, array)` (e.g. onto a device) before the next is read, so with a lazy `state`
  the host holds one tensor at a time beside what is placed.
  """
  want = _flatten(expected)
  got: dict[tuple, np.ndarray] = {}
  extra = []
  for key, value in state.items():
    new_key = rename(key)
    if new_key is None:
      continue
    path = torch_module_path(new_key)
    module, leaf = path[:-1], path[-1]
    candidates = [module + (c,) for c in _WEIGHT_LEAVES] if leaf == "weight" else [path]
    target = next((c for c in candidates if c in want), None)
    if target is None:
      extra.append(key)
      continue
    torch_shape = np.shape(value)
    value = _to_flax_layout(target[-1], np.asarray(value))
    shape = tuple(want[target].shape)
    if value.shape != shape:
      raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(torch_shape)}, "
                            f"the model config expects {shape} (as Flax {'/'.join(target)})")
    if hasattr(want[target], "dtype"):
      value = value.astype(np.dtype(want[target].dtype), copy=False)
    got[target] = place(target, value)
    del value
  missing = sorted("/".join(p) for p in want if p not in got)
  if extra:
    raise CheckpointError(f"{source}: unexpected weight keys not used by the model: {sorted(extra)[:10]}"
                          + (f" (+{len(extra) - 10} more)" if len(extra) > 10 else ""))
  if missing:
    raise CheckpointError(f"{source}: missing weights for {missing[:10]}"
                          + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
  return _unflatten(got)


def params_to_state_dict(params: Mapping, literal: frozenset[str] = frozenset(),
                         rename: Callable[[str], str] = lambda k: k) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: a float32 PyTorch-layout state dict."""
  out = {}
  for path, value in _flatten(params).items():
    leaf = path[-1]
    torch_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    key = rename(flax_module_key(path[:-1], literal) + ("." if len(path) > 1 else "") + torch_leaf)
    out[key] = np.asarray(_to_torch_layout(leaf, np.asarray(value, dtype=np.float32)), order="C")
  return out


# ---------------------------------------------------------------------------------------------
# diffusers model folders (the UNet's and the VAE's `load` / `save`).

def load_diffusers_folder(folder: str, build, param_shapes, dtype, rename=lambda k: k):
  """A diffusers model folder (config.json + safetensors or .bin) -> (module, params)."""
  config = read_config(folder)
  module = build(config, dtype, source=os.path.join(folder, "config.json"))
  state, source = load_state_dict(folder)  # lazy: read, converted and placed leaf by leaf
  params = state_dict_to_params(state, param_shapes(module), source, rename=rename, place=to_device)
  return module, params


def save_diffusers_folder(folder: str, config: dict, params, class_name: str, literal=frozenset()) -> None:
  """config.json + diffusion_pytorch_model.safetensors, which diffusers' from_pretrained loads."""
  write_config(folder, {**dict(config), "_class_name": class_name})
  state = params_to_state_dict(jax.device_get(params), literal=literal)
  save_state_dict(folder, state, name="diffusion_pytorch_model.safetensors")
