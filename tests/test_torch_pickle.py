"""The torch-free .pth/.bin reader against torch.load on files torch.save writes (and crafted ones)."""
import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from synood_jax.models import checkpoint_io  # noqa: E402
from synood_jax.models.checkpoint_io import CheckpointError  # noqa: E402
from synood_jax.models.torch_pickle import TorchPickleError, TorchPickleFile, UnsupportedPickle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(t):
  return t.detach().float().numpy() if t.is_floating_point() else t.numpy()


def _assert_matches(lazy, path):
  """Every tensor of `lazy` equals torch.load's, number for number, in the same key order."""
  ref = torch.load(path, map_location="cpu", weights_only=True)
  ref = ref.get("state_dict", ref)
  ref = {k: v for k, v in ref.items() if torch.is_tensor(v)}
  assert list(lazy) == list(ref) and len(lazy) == len(ref)
  for k, t in ref.items():
    got, want = lazy[k], _reference(t)
    assert got.shape == want.shape and got.dtype == want.dtype, (k, got.shape, got.dtype, want.shape, want.dtype)
    assert got.flags.c_contiguous, k
    np.testing.assert_array_equal(got, want, err_msg=k)


def _random(seed=0):
  g = torch.Generator().manual_seed(seed)
  return {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(4, 2, generator=g).half(),
          "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(5, generator=g).double(),
          "i64": torch.randint(-9, 9, (2, 3), generator=g), "i32": torch.randint(-9, 9, (4,), generator=g).int(),
          "i16": torch.randint(-9, 9, (3,), generator=g).short(), "i8": torch.randint(-9, 9, (3,), generator=g).char(),
          "u8": torch.randint(0, 255, (2, 2), generator=g).byte(), "bool": torch.rand(7, generator=g) > 0.5,
          "u16": torch.randint(0, 60000, (3,), generator=g).to(torch.uint16),  # rebuilt by _rebuild_tensor_v3
          "nbt": torch.tensor(7)}


def test_every_dtype_matches_torch_load(tmp_path):
  path = str(tmp_path / "m.pth")
  torch.save(_random(), path)
  lazy = TorchPickleFile(path)
  _assert_matches(lazy, path)
  assert lazy["bf16"].dtype == np.float32 and lazy["f16"].dtype == np.float32 and lazy["f64"].dtype == np.float32
  assert lazy["i64"].dtype == np.int64 and lazy["bool"].dtype == np.bool_ and lazy["u8"].dtype == np.uint8
  assert lazy["nbt"].shape == () and lazy["nbt"] == 7


def test_views_offsets_and_shared_storage(tmp_path):
  g = torch.Generator().manual_seed(1)
  w = torch.randn(4, 6, generator=g)
  cube = torch.randn(2, 3, 4, generator=g)
  sd = {"w": w, "w_t": w.t(), "rows": w[1:3], "cols": w[:, 1::2], "elem": w[2, 3], "cube_perm": cube.permute(2, 0, 1),
        "cube_slice": cube[1], "expanded": torch.arange(3.0).expand(4, 3), "unsq": w[1].unsqueeze(0),
        "empty": w[:0], "half_t": w.half().t(), "bf16_view": w.bfloat16()[1:, ::3]}
  path = str(tmp_path / "views.pth")
  torch.save(sd, path)
  with zipfile.ZipFile(path) as zf:  # the views really share one storage and are saved as views
    assert len([n for n in zf.namelist() if "/data/" in n]) == 5
  lazy = TorchPickleFile(path)
  _assert_matches(lazy, path)
  np.testing.assert_array_equal(lazy["w_t"], w.numpy().T)
  assert lazy["elem"].shape == () and lazy["empty"].shape == (0, 6)


def test_module_state_dict_parameters_and_wrapper(tmp_path):
  torch.manual_seed(0)
  model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 2))
  with torch.no_grad():
    model[1].running_mean.uniform_(-1, 1)
    model[1].num_batches_tracked.fill_(11)
  sd = model.state_dict()  # an OrderedDict with `_metadata`
  path = str(tmp_path / "module.pth")
  torch.save(sd, path)
  _assert_matches(TorchPickleFile(path), path)
  params = {name: p for name, p in model.named_parameters()}  # nn.Parameter values, pickled as parameters
  params["flag"] = nn.Parameter(torch.ones(2), requires_grad=False)
  torch.save(params, tmp_path / "params.pth")
  _assert_matches(TorchPickleFile(str(tmp_path / "params.pth")), str(tmp_path / "params.pth"))
  wrapped = str(tmp_path / "wrapped.pth")
  torch.save({"state_dict": sd, "epoch": 3, "arch": "tiny"}, wrapped)
  lazy = TorchPickleFile(wrapped)
  _assert_matches(lazy, wrapped)
  # Non-tensor values are left out of the mapping (they are not weights) and kept in `other`.
  torch.save({"w": torch.ones(2), "step": 5}, tmp_path / "mixed.pth")
  mixed = TorchPickleFile(str(tmp_path / "mixed.pth"))
  assert list(mixed) == ["w"] and mixed.other == {"step": 5}
  loaded = checkpoint_io.read_torch_file(str(tmp_path / "mixed.pth"))
  assert list(loaded) == ["w"]


def test_through_load_state_dict_and_no_tensors(tmp_path):
  sd = _random(2)
  torch.save(sd, tmp_path / "pytorch_model.bin")
  state, source = checkpoint_io.load_state_dict(str(tmp_path))
  assert source.endswith("pytorch_model.bin")
  for k, t in sd.items():
    np.testing.assert_array_equal(state[k], _reference(t))
  torch.save({"model": {"w": torch.ones(1)}, "optimizer": {}}, tmp_path / "nested.pth")
  with pytest.raises(CheckpointError, match=r"nested\.pth: no tensors at the top level.*'model', 'optimizer'"):
    checkpoint_io.read_torch_file(str(tmp_path / "nested.pth"))


def test_legacy_format_falls_back_to_torch(tmp_path):
  sd = _random(3)
  del sd["u16"]  # the legacy format cannot save uint16
  folder = tmp_path / "legacy"
  os.makedirs(folder)
  torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
  with pytest.raises(UnsupportedPickle, match="not a zip archive"):
    TorchPickleFile(str(folder / "pytorch_model.bin"))
  state, _ = checkpoint_io.load_state_dict(str(folder))
  assert sorted(state) == sorted(sd)
  for k, t in sd.items():
    np.testing.assert_array_equal(state[k], _reference(t))


def _rewrite(src, dst, change):
  """Copy a zip record by record, replacing the bytes of the records named in `change`."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
      zout.writestr(info.filename, change.get(info.filename, zin.read(info.filename)))


def _crafted(path, pkl):
  """A torch-style zip archive whose data.pkl is `pkl`."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")


class Custom:
  def __init__(self):
    self.value = 1


def test_disallowed_globals_are_refused_and_never_run(tmp_path):
  marker = tmp_path / "ran"
  # pickle protocol 2 by hand: {'w': os.system('touch <marker>')}
  command = f"touch {marker}".encode()
  evil = (b"\x80\x02}X\x01\x00\x00\x00wcos\nsystem\nX" + len(command).to_bytes(4, "little") + command
          + b"\x85Rs.")
  path = str(tmp_path / "evil.pth")
  _crafted(path, evil)
  with pytest.raises(UnsupportedPickle, match=r"evil\.pth: data\.pkl needs global 'os\.system'"):
    TorchPickleFile(path)
  with pytest.raises(CheckpointError, match=r"evil\.pth: data\.pkl needs global 'os\.system'.*torch\.load"):
    checkpoint_io.read_torch_file(path)  # torch.load(weights_only=True) refuses it too
  assert not marker.exists()
  pickle.loads(evil)  # the crafted pickle does run a command when unpickled without restriction
  assert marker.exists()
  custom = str(tmp_path / "custom.pth")
  torch.save({"w": torch.ones(2), "obj": Custom()}, custom)
  with pytest.raises(CheckpointError, match=r"custom\.pth: data\.pkl needs global '[\w.]*test_torch_pickle\.Custom'"):
    checkpoint_io.read_torch_file(custom)


def test_without_torch_a_refused_file_names_file_and_global(tmp_path):
  path = str(tmp_path / "evil.pth")
  _crafted(path, b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
  code = ("import sys; sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
          "from synood_jax.models import checkpoint_io\n"
          f"try:\n  checkpoint_io.read_torch_file({path!r})\n"
          "except checkpoint_io.CheckpointError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, check=True).stdout
  assert "evil.pth: data.pkl needs global 'builtins.eval'" in out and "needs torch" in out, out


def test_big_endian_file(tmp_path):
  sd = {"a": torch.randn(3, 2), "b": torch.arange(-3, 3), "c": torch.randn(4).bfloat16(), "d": torch.ones(2).bool()}
  path, big = str(tmp_path / "little.pth"), str(tmp_path / "big.pth")
  torch.save(sd, path)
  with zipfile.ZipFile(path) as zf:  # storages are keyed in the order torch.save met them
    top = zf.namelist()[0].split("/")[0]
    change = {f"{top}/data/{i}": np.frombuffer(zf.read(f"{top}/data/{i}"), dt).byteswap().tobytes()
              for i, dt in enumerate([np.float32, np.int64, np.uint16, np.bool_])}
  change[f"{top}/byteorder"] = b"big"
  _rewrite(path, big, change)
  lazy = TorchPickleFile(big)
  _assert_matches(lazy, big)  # torch.load swaps big-endian storages too
  for k, t in sd.items():
    np.testing.assert_array_equal(lazy[k], _reference(t))


def test_broken_files_name_file_and_key(tmp_path):
  path, cut = str(tmp_path / "good.pth"), str(tmp_path / "cut.pth")
  torch.save({"a": torch.ones(2), "w": torch.ones(8, 8)}, path)
  with zipfile.ZipFile(path) as zf:
    top = zf.namelist()[0].split("/")[0]
    short = zf.read(f"{top}/data/1")[:-4]
  _rewrite(path, cut, {f"{top}/data/1": short})
  with pytest.raises(CheckpointError, match=r"cut\.pth: tensor 'w': data/1 has 252 bytes, its storage 256"):
    checkpoint_io.read_torch_file(cut)
  with pytest.raises(TorchPickleError, match=r"cut\.pth: tensor 'w'"):
    TorchPickleFile(cut)
  # A file cut after it was opened: the error comes when the tensor is read, naming file and key.
  lazy = checkpoint_io.read_torch_file(path)
  with zipfile.ZipFile(path) as zf:
    start = zf.getinfo(f"{top}/data/1").header_offset
  with open(path, "r+b") as f:
    f.truncate(start + 10)
  with pytest.raises(CheckpointError, match=r"good\.pth: tensor 'w' \(data/1\) cannot be read"):
    lazy["w"]
  torch.save([torch.ones(1)], tmp_path / "list.pth")
  with pytest.raises(CheckpointError, match=r"list\.pth: top-level object is a list, not a state dict"):
    checkpoint_io.read_torch_file(str(tmp_path / "list.pth"))


def test_loading_imports_no_torch(tmp_path):
  from synood_jax.testing.torch_reference import random_resnet  # noqa: PLC0415  (imports torch)
  torch.save(random_resnet((1, 1, 1, 1), 8, 10, seed=0).state_dict(), tmp_path / "resnet.pth")
  os.makedirs(tmp_path / "hf")
  torch.save(_random(4), tmp_path / "hf" / "pytorch_model.bin")
  code = ("import sys\n"
          "from synood_jax.models import checkpoint_io, resnet\n"
          f"state, _ = checkpoint_io.load_state_dict({str(tmp_path / 'hf')!r})\n"
          "total = sum(float(state[k].astype('float64').sum()) for k in state)\n"
          f"module, params = resnet.load({str(tmp_path / 'resnet.pth')!r}, layers=(1, 1, 1, 1), width=8,"
          " num_classes=10)\n"
          "print(len(state), len(params), 'torch' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, check=True).stdout.split()
  assert out == [str(len(_random(4))), "7", "False"], out
