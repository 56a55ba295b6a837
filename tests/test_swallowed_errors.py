"""Errors that used to be swallowed: each now raises a message naming what is wrong, or logs once."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synood_jax import parallel
from synood_jax.diffusion import inpaint
from synood_jax.jsonl import JsonlError, read_jsonl
from synood_jax.synthesis import manifest
from synood_jax.train import loop


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_jsonl_forgives_only_a_torn_last_line(tmp_path):
  rows = [{"source": f"c/{i}.jpg", "output": f"c/{i}_ood.png"} for i in range(3)]
  good = "".join(json.dumps(r) + "\n" for r in rows)
  assert read_jsonl(_write(tmp_path / "a.jsonl", good)) == rows
  # Cut mid-write by a kill: the last line is dropped, the rest kept.
  assert read_jsonl(_write(tmp_path / "b.jsonl", good + '{"source": "c/3.j')) == rows
  # A parsed last line without its newline may be incomplete too.
  assert read_jsonl(_write(tmp_path / "c.jsonl", good + json.dumps(rows[0]))) == rows
  # A damaged line in the middle used to end the read there: now it names the file and the line.
  bad = _write(tmp_path / "d.jsonl", json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n")
  with pytest.raises(JsonlError, match=r"d\.jsonl: line 2 is not JSON"):
    read_jsonl(bad)
  with pytest.raises(JsonlError, match=r"manifest\.jsonl: line 2 lacks the key\(s\) \['output'\]"):
    manifest.read_records(_write(tmp_path / "manifest.jsonl", good.replace(', "output": "c/1_ood.png"', "")))


def test_metrics_rows_past_the_restored_step_are_dropped_and_damage_raises(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
  loop._MetricWriter(str(tmp_path), start_step=3, tensorboard=False).close()
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == rows[:3]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step" 2}\n{"step": 3}\n')
  with pytest.raises(JsonlError, match="line 2"):
    loop._MetricWriter(str(tmp_path), start_step=3, tensorboard=False)


def test_tensorboard_asked_for_but_missing_is_an_error(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_tensorboardx(name, *args, **kwargs):
    if name == "tensorboardX":
      raise ImportError(name)
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
  with pytest.raises(ImportError, match=r"config.tensorboard=True needs tensorboardX"):
    loop._MetricWriter(str(tmp_path), start_step=0, tensorboard=True)


def test_decode_chunk_that_does_not_divide_the_batch_is_refused():
  decode = lambda params, z: z * params  # a stand-in decoder: images = 2 * z / scale
  z = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)
  with pytest.raises(ValueError, match=r"decode_chunk=4 does not divide the batch of 6"):
    inpaint.decode_images(decode, 2.0, z, 1.0, chunk=4)
  whole = inpaint.decode_images(decode, 2.0, z / 100, 1.0)
  chunked = inpaint.decode_images(decode, 2.0, z / 100, 1.0, chunk=3)
  np.testing.assert_array_equal(chunked, whole)
  np.testing.assert_allclose(whole, np.clip(2 * np.asarray(z) / 100 / 2 + 0.5, 0, 1), rtol=1e-6)


def test_fsdp_logs_the_params_it_cannot_shard(caplog):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
  params = {"even": np.zeros((64, 128), np.float32), "odd": np.zeros((63, 129), np.float32),
            "small": np.zeros((3,), np.float32)}
  with caplog.at_level(logging.WARNING):
    sh = parallel.param_shardings(params, mesh)
  assert sh["even"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert sh["odd"].spec == jax.sharding.PartitionSpec() and sh["small"].spec == jax.sharding.PartitionSpec()
  warnings = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
  assert len(warnings) == 1 and "odd(63, 129)" in warnings[0] and "small" not in warnings[0]
  with pytest.raises(ValueError, match="unknown tactic 'shard_all'"):
    parallel.param_shardings(params, mesh, ((".*", "shard_all"),))
