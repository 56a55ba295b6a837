"""The lazy checkpoint reader against safetensors' and torch's own readers, and leaf-by-leaf placement."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from synood_jax.models import checkpoint_io  # noqa: E402
from synood_jax.models.checkpoint_io import CheckpointError  # noqa: E402


def _tensors():
  g = torch.Generator().manual_seed(0)
  return {"a.weight": torch.randn(3, 5, generator=g), "a.half": torch.randn(4, generator=g).half(),
          "b.bf16": torch.randn(2, 3, generator=g).bfloat16(), "c.ids": torch.arange(6).reshape(2, 3),
          "d.scalar": torch.tensor(2.5), "e.flag": torch.tensor([True, False])}


def _reference(t):
  return t.float().numpy() if t.is_floating_point() else t.numpy()


def test_safetensors_file_matches_torch_reader(tmp_path):
  tensors = _tensors()
  path = str(tmp_path / "model.safetensors")
  save_file(tensors, path)
  lazy = checkpoint_io.SafetensorsFile(path)
  assert sorted(lazy) == sorted(tensors) and len(lazy) == len(tensors)
  for k, t in tensors.items():
    got, ref = lazy[k], _reference(t)
    assert got.shape == ref.shape and got.dtype == ref.dtype, k
    np.testing.assert_array_equal(got, ref, err_msg=k)  # bf16 and f16 widen exactly


def test_folder_of_shards_and_torch_pickle(tmp_path):
  tensors = _tensors()
  names = sorted(tensors)
  save_file({k: tensors[k] for k in names[:3]}, str(tmp_path / "m-1.safetensors"))
  save_file({k: tensors[k] for k in names[3:]}, str(tmp_path / "m-2.safetensors"))
  index = {"weight_map": {k: ("m-1.safetensors" if k in names[:3] else "m-2.safetensors") for k in names}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  state, source = checkpoint_io.load_state_dict(str(tmp_path))
  assert "m-1.safetensors" in source and "m-2.safetensors" in source
  assert sorted(state) == names
  for k in names:
    np.testing.assert_array_equal(state[k], _reference(tensors[k]))
  pickled = tmp_path / "bin"
  os.makedirs(pickled)
  torch.save(tensors, pickled / "pytorch_model.bin")
  state, _ = checkpoint_io.load_state_dict(str(pickled))
  for k in names:
    np.testing.assert_array_equal(state[k], _reference(tensors[k]))


def test_broken_files_name_file_and_tensor(tmp_path):
  path = str(tmp_path / "model.safetensors")
  save_file({"w": torch.ones(64, 64)}, path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated at tensor 'w'"):
    checkpoint_io.SafetensorsFile(path)["w"]
  (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
  with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
    checkpoint_io.SafetensorsFile(str(tmp_path / "junk.safetensors"))


def test_each_leaf_is_converted_and_placed_before_the_next_is_read(tmp_path):
  """state_dict_to_params reads, converts (linear: transposed; conv: OIHW -> HWIO) and places one leaf
  at a time."""
  lin, conv = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
  save_file({"lin.weight": torch.from_numpy(lin), "conv.weight": torch.from_numpy(conv)},
            str(tmp_path / "model.safetensors"))
  state, source = checkpoint_io.load_state_dict(str(tmp_path))
  events = []

  class Recording(type(state)):
    def __getitem__(self, key):
      events.append(("read", key))
      return super().__getitem__(key)

  recording = Recording([checkpoint_io.SafetensorsFile(str(tmp_path / "model.safetensors"))])
  shapes = {"lin": {"kernel": np.zeros((3, 2), np.float32)}, "conv": {"kernel": np.zeros((2, 2, 3, 2), np.float32)}}

  def place(path, x):
    events.append(("place", "/".join(path)))
    return x.copy()

  params = checkpoint_io.state_dict_to_params(recording, shapes, source, place=place)
  np.testing.assert_array_equal(params["lin"]["kernel"], lin.T)
  np.testing.assert_array_equal(params["conv"]["kernel"], conv.transpose(2, 3, 1, 0))
  assert [e[0] for e in events] == ["read", "place", "read", "place"]
