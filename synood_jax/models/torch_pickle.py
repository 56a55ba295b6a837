"""Read PyTorch checkpoints (`torch.save`'s zip format) with numpy, zipfile and a restricted unpickler.

No torch import. The format (torch >= 1.6): a zip whose one top folder `<name>/` holds
  data.pkl    the pickled object; each tensor is `torch._utils._rebuild_tensor_v2(storage, offset,
              size, stride, requires_grad, hooks)` (v3 adds a dtype, for uint16/32/64) and each storage a
              persistent id `('storage', torch.<Type>Storage, key, location, numel)`;
  data/<key>  the raw bytes of storage `key`;
  byteorder   "little" or "big" (absent in old files: little).
A tensor of shape (n_0, ..., n_{d-1}) is the strided view
  t[i_0, ..., i_{d-1}] = storage[offset + sum_k i_k * stride_k],
so several tensors may share a storage, and a saved transpose keeps its permuted strides.

Unpickling builds placeholders only; `TorchPickleFile[key]` reads that tensor's bytes from the zip when
asked for, like `checkpoint_io.SafetensorsFile`: floating tensors come back as C-contiguous float32
(float16 and bfloat16 widened exactly), others as stored.

The unpickler resolves only the globals a state dict needs (`_ALLOWED`); anything else raises
`UnsupportedPickle` naming it before it is called, so a hostile pickle runs nothing.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np


class TorchPickleError(ValueError):
  """A torch checkpoint that is broken (truncated storage, a view past its storage, not a dict)."""


class UnsupportedPickle(TorchPickleError):
  """A file this reader does not take (legacy non-zip pickle, a global outside `_ALLOWED`); a caller may
  hand it to torch.load(weights_only=True) instead."""


# torch dtype name -> (numpy dtype the bytes are read as, itemsize). bfloat16 is read as uint16 and widened.
_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
           "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
           "bool": np.bool_, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}

_STORAGE_TYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


def to_float32(raw: np.ndarray, bfloat16: bool = False) -> np.ndarray:
  """A floating array as float32 (`bfloat16`: `raw` holds bfloat16 bits as uint16, the high half of a
  float32); any other dtype unchanged."""
  if bfloat16:
    return (raw.astype(np.uint32) << 16).view(np.float32)
  return raw.astype(np.float32) if raw.dtype.kind == "f" and raw.dtype != np.float32 else raw


class _StorageType:
  """What `torch.<Type>Storage` (dtype fixed) or `torch.storage.UntypedStorage` (bytes) unpickles to."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: str | None):
    self.dtype = dtype


class _DType:
  """What a `torch.<dtype>` global unpickles to (rebuild v3's dtype argument)."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name


class _Storage:
  __slots__ = ("key", "nbytes", "dtype")

  def __init__(self, key: str, nbytes: int, dtype: str | None):
    self.key, self.nbytes, self.dtype = key, nbytes, dtype


class _Tensor:
  """A tensor not yet read: its storage, dtype and strided view (in elements of `dtype`)."""
  __slots__ = ("storage", "dtype", "offset", "shape", "stride")

  def __init__(self, storage, dtype, offset, shape, stride):
    self.storage, self.dtype, self.offset, self.shape, self.stride = storage, dtype, offset, shape, stride


def _ints(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, tuple) or not all(type(i) is int and i >= 0 for i in x):  # noqa: E721 (no bools)
    raise TorchPickleError(f"tensor {what} {x!r} is not a tuple of non-negative ints")
  return x


def _tensor(storage, offset, size, stride, dtype: str, metadata) -> _Tensor:
  if not isinstance(storage, _Storage):
    raise TorchPickleError(f"tensor storage is {type(storage).__name__}, not a storage")
  if metadata:  # tensor flags (e.g. conjugate/negative views) we would have to apply
    raise UnsupportedPickle(f"tensor metadata {metadata!r} is not supported")
  if type(offset) is not int or offset < 0:  # noqa: E721
    raise TorchPickleError(f"tensor storage offset {offset!r} is not a non-negative int")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise TorchPickleError(f"tensor size {size} and stride {stride} differ in length")
  return _Tensor(storage, dtype, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  del requires_grad, hooks  # autograd state: nothing to keep in a numpy array
  if not isinstance(storage, _Storage) or storage.dtype is None:
    raise TorchPickleError("_rebuild_tensor_v2 needs a typed storage")
  return _tensor(storage, offset, size, stride, storage.dtype, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  del requires_grad, hooks
  if not isinstance(dtype, _DType):
    raise TorchPickleError(f"_rebuild_tensor_v3 dtype is {dtype!r}")
  return _tensor(storage, offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad=True, hooks=None):
  del requires_grad, hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
  del requires_grad, hooks, state  # python attributes set on the Parameter
  return data


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch.storage.UntypedStorage": _StorageType(None),
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
    **{f"torch.{name}": _DType(name) for name in _DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals; storages become `_Storage` placeholders (one per key)."""

  def __init__(self, file, storages: set[str]):
    super().__init__(file)
    self._records, self._seen = storages, {}

  def find_class(self, module: str, name: str):
    full = f"{module}.{name}"
    if full not in _ALLOWED:
      raise UnsupportedPickle(f"data.pkl needs global {full!r}, which is not part of a tensor state dict")
    return _ALLOWED[full]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsupportedPickle(f"persistent id {pid!r} is not a storage")
    _, kind, key, _, numel = pid
    if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int:  # noqa: E721
      raise TorchPickleError(f"malformed storage id {pid!r}")
    if key not in self._records:
      raise TorchPickleError(f"storage {key!r} has no data/{key} record")
    if key not in self._seen:
      itemsize = np.dtype(_DTYPES[kind.dtype]).itemsize if kind.dtype else 1
      self._seen[key] = _Storage(key, numel * itemsize, kind.dtype)
    return self._seen[key]


def _top_folder(zf: zipfile.ZipFile, path: str) -> str:
  pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise UnsupportedPickle(f"zip holds {len(pkl)} top-level */data.pkl records, not one")
  return pkl[0][: -len("data.pkl")]


class TorchPickleFile(Mapping):
  """The tensors of one torch zip checkpoint, each read from the zip when asked for.

  The top-level object must be a dict, or a dict whose "state_dict" entry is one (unwrapped). Its
  tensor values are the keys of this mapping; other values (ints, strings, nested dicts such as an
  optimizer state) are left out of it and kept, as unpickled, in `self.other`.
  """

  def __init__(self, path: str):
    self.path = path
    try:
      self._open(path)
    except TorchPickleError as e:
      raise type(e)(f"{path}: {e}") from e

  def _open(self, path: str) -> None:
    if not os.path.isfile(path):
      raise TorchPickleError("no such file")
    if not zipfile.is_zipfile(path):
      raise UnsupportedPickle("not a zip archive (a legacy torch.save pickle?)")
    with zipfile.ZipFile(path) as zf:
      top = _top_folder(zf, path)
      infos = {i.filename: i for i in zf.infolist()}
      records = {name[len(top) + 5:] for name in infos if name.startswith(top + "data/")}
      order = zf.read(top + "byteorder").strip() if top + "byteorder" in infos else b"little"
      if order not in (b"little", b"big"):
        raise TorchPickleError(f"byteorder record is {order!r}")
      with zf.open(top + "data.pkl") as f:
        try:
          obj = _Unpickler(f, records).load()
        except TorchPickleError:
          raise
        except Exception as e:  # noqa: BLE001  (a broken pickle raises any of a dozen types)
          raise TorchPickleError(f"data.pkl does not unpickle ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise TorchPickleError(f"top-level object is a {type(obj).__name__}, not a state dict")
    self._tensors = {k: v for k, v in obj.items() if isinstance(v, _Tensor)}
    self.other = {k: v for k, v in obj.items() if not isinstance(v, _Tensor)}
    if self.other and not self._tensors:
      raise TorchPickleError(f"no tensors at the top level (keys {sorted(map(str, self.other))[:10]}); "
                             "expected a state dict or {'state_dict': state dict}")
    self._infos = {k: infos[top + "data/" + k] for k in records}
    self._big = order == b"big"
    self._starts: dict[str, int] = {}
    for key, t in self._tensors.items():
      self._check(key, t)

  def _check(self, key, t: _Tensor) -> None:
    """Bounds of the view against its storage, before any byte is read."""
    itemsize = np.dtype(_DTYPES[t.dtype]).itemsize
    if self._infos[t.storage.key].file_size < t.storage.nbytes:
      raise TorchPickleError(f"tensor {key!r}: data/{t.storage.key} has {self._infos[t.storage.key].file_size} "
                             f"bytes, its storage {t.storage.nbytes}")
    if 0 not in t.shape and (t.offset + _extent(t)) * itemsize > t.storage.nbytes:
      raise TorchPickleError(f"tensor {key!r}: view offset {t.offset}, size {t.shape}, stride {t.stride} "
                             f"runs past its storage of {t.storage.nbytes} bytes")

  def __getitem__(self, key) -> np.ndarray:
    t = self._tensors[key]
    try:
      return to_float32(self._read(t), bfloat16=t.dtype == "bfloat16")
    except OSError as e:
      raise TorchPickleError(f"{self.path}: tensor {key!r} (data/{t.storage.key}) cannot be read ({e})") from e

  def _read(self, t: _Tensor) -> np.ndarray:
    dtype = np.dtype(_DTYPES[t.dtype])
    if 0 in t.shape:
      return np.empty(t.shape, dtype)
    n = _extent(t)
    buf = np.empty(n, dtype.newbyteorder(">") if self._big else dtype)
    self._read_bytes(t.storage.key, t.offset * dtype.itemsize, memoryview(buf).cast("B"))
    if self._big:
      buf = buf.astype(dtype)
    if n == int(np.prod(t.shape)) and t.stride == _contiguous_strides(t.shape):
      return buf.reshape(t.shape)
    view = np.lib.stride_tricks.as_strided(buf, t.shape, [s * dtype.itemsize for s in t.stride], writeable=False)
    return np.array(view, order="C")  # not ascontiguousarray: that turns 0-d into (1,)

  def _read_bytes(self, key: str, begin: int, out: memoryview) -> None:
    info = self._infos[key]
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
      with open(self.path, "rb") as f:
        f.seek(self._start(f, key) + begin)
        got = f.readinto(out)
    else:  # torch never compresses, but a re-zipped checkpoint may be
      with zipfile.ZipFile(self.path) as zf, zf.open(info) as f:
        f.seek(begin)
        got = f.readinto(out)
    if got != len(out):
      raise OSError(f"truncated: {got} of {len(out)} bytes")

  def _start(self, f, key: str) -> int:
    """Where record `key`'s bytes begin: after its local header (30 bytes, the name, an extra field)."""
    if key not in self._starts:
      info = self._infos[key]
      f.seek(info.header_offset)
      header = f.read(30)
      if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise OSError(f"no local zip header at byte {info.header_offset}")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      self._starts[key] = info.header_offset + 30 + name_len + extra_len
    return self._starts[key]

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def _extent(t: _Tensor) -> int:
  """Elements from the first to the last one the view touches (shape has no zero)."""
  return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  out, step = [], 1
  for n in reversed(shape):
    out.append(step)
    step *= n
  return tuple(reversed(out))
