"""Meshes, param sharding and sharded CLIP encoding on the 8 fake CPU devices (conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from synood_jax import parallel
from synood_jax.models import zero_shot
from synood_jax.models import clip
from synood_jax.demo import tiny_clip as tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  # Wide enough (64 x 256 MLP kernels) that the fsdp rule actually shards some params.
  folder = tiny.make_tiny_clip(str(tmp_path_factory.mktemp("tiny")), seed=0, vision_hidden_size=64,
                               vision_intermediate_size=256, text_hidden_size=64, text_intermediate_size=256)
  bundle = clip.from_pretrained(folder)
  images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
  encode = jax.jit(bundle.encode_image)
  return bundle, images, encode, np.asarray(encode(bundle.params, images))


def test_eight_devices():
  assert jax.device_count() == 8


def test_batch_sharded_over_data(setup):
  bundle, images, encode, want = setup
  mesh = parallel.make_mesh(data=8)
  params = jax.device_put(bundle.params, parallel.replicated(mesh))
  batch = parallel.global_batch(images, mesh)
  assert batch.sharding.spec == P(("data", "fsdp"), None, None, None)
  assert len({s.device for s in batch.addressable_shards}) == 8
  got = encode(params, batch)
  np.testing.assert_allclose(parallel.to_host(got), want, atol=1e-5, rtol=0)


def test_fsdp_params_on_data2_fsdp4(setup):
  bundle, images, encode, want = setup
  mesh = parallel.make_mesh(data=2, fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  shardings = parallel.param_shardings(bundle.params, mesh)
  specs = [s.spec for s in jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))]
  assert any("fsdp" in spec for spec in specs), "nothing was FSDP-sharded: the test would prove nothing"
  params = jax.device_put(bundle.params, shardings)
  fc1 = params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.addressable_shards[0].data.size == fc1.size // 4
  got = encode(params, parallel.global_batch(images, mesh))
  np.testing.assert_allclose(parallel.to_host(got), want, atol=1e-5, rtol=0)
  # zero_shot with the mesh: padded (13 rows -> 16) and sharded, equal to the 1-device run
  feats = zero_shot.image_features(bundle, params, images[:13], batch_size=16, mesh=mesh)
  ref = want[:13] / np.linalg.norm(want[:13], axis=-1, keepdims=True)
  np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=0)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="data=3 x fsdp=1"):
    parallel.make_mesh(data=3)
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="does not use the 8 devices"):
    parallel.make_mesh(data=2, fsdp=3)
  assert dict(parallel.make_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4}
  assert dict(parallel.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}


def test_pad_batch():
  x = np.arange(10).reshape(5, 2)
  padded, n = parallel.pad_batch(x, 4)
  assert n == 5 and padded.shape == (8, 2)
  np.testing.assert_array_equal(padded[:5], x)
  np.testing.assert_array_equal(padded[5:], np.repeat(x[-1:], 3, axis=0))
  same, n = parallel.pad_batch(x, 5)
  assert n == 5 and same is x
  assert parallel.batch_size_multiple(parallel.make_mesh(data=2, fsdp=4)) == 8


def test_fsdp_rule_small_or_indivisible_replicates():
  mesh = parallel.make_mesh(data=2, fsdp=4)
  assert parallel.fsdp((64, 256), mesh) == P(None, "fsdp")
  assert parallel.fsdp((8, 8), mesh) == P()  # below min_size
  assert parallel.fsdp((4099, 3), mesh) is None  # no dim divisible by 4: param_shardings replicates, logs


