"""Stages 2 and 3 against PyTorch (same init, same data order), training signal, kill -9 resume."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch

from synood_jax.train import loop, negatives, projection

from synood_jax import config as config_lib
from synood_jax import parallel
from synood_jax.progress import Progress, format_seconds

D, C, M = 16, 3, 4      # feature size, ID classes, mined negatives
N, B, EPOCHS = 20, 8, 2  # 3 steps per epoch: 8, 8 and a padded last batch of 4


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  f = (3.0 * rng.normal(size=(N, D))).astype(np.float32)   # raw (unnormalised) CLIP-like embeddings
  text = rng.normal(size=(C + M, D)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  y2 = projection.stage2_labels(rng.integers(0, C, N // 2), rng.integers(0, M, N - N // 2), C)
  y3 = rng.integers(0, M, N)
  return f, text, y2, y3


def _stage2_config(**kw):
  c = config_lib.stage2_config()
  c.update(batch_size=B, epochs=EPOCHS, checkpoint_every=4, progress_every_secs=0.0)
  c.update(kw)
  return c


def _stage3_config(**kw):
  c = config_lib.stage3_config()
  c.update(batch_size=B, epochs=EPOCHS, checkpoint_every=4, progress_every_secs=0.0, keep_epoch=1)
  c.update(kw)
  return c


def _torch_batches(epoch, n, bs, seed):
  perm = loop.epoch_permutation(seed, epoch, n)
  return [torch.from_numpy(perm[i:i + bs]) for i in range(0, n, bs)]  # short last batch, as DataLoader


def test_stage2_matches_torch(tmp_path, mesh, data):
  f, text, y, _ = data
  config = _stage2_config()
  init = projection.init_projection(D, config.seed)
  ours = projection.train_projection(config, f, y, text, str(tmp_path), mesh)

  torch.manual_seed(0)
  proj = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.LayerNorm(D), torch.nn.ReLU())
  p0 = init["params"]
  with torch.no_grad():
    proj[0].weight.copy_(torch.tensor(np.asarray(p0["0"]["kernel"]).T))
    proj[0].bias.copy_(torch.tensor(np.asarray(p0["0"]["bias"])))
    proj[1].weight.copy_(torch.tensor(np.asarray(p0["1"]["scale"])))
    proj[1].bias.copy_(torch.tensor(np.asarray(p0["1"]["bias"])))
  opt = torch.optim.Adam(proj.parameters(), lr=1e-3, weight_decay=1e-5)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS, 1e-5)
  ft, tt, yt = torch.from_numpy(f), torch.from_numpy(text), torch.from_numpy(y).long()
  losses = []
  for epoch in range(EPOCHS):
    for idx in _torch_batches(epoch, N, B, config.seed):
      g = ft[idx] + proj(ft[idx])
      g = torch.nn.functional.normalize(g, dim=-1)
      loss = torch.nn.functional.cross_entropy(100.0 * g @ tt.T, yt[idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
      losses.append(loss.item())
    sched.step()

  got = ours["params"]
  np.testing.assert_allclose(got["0"]["kernel"], proj[0].weight.detach().numpy().T, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["0"]["bias"], proj[0].bias.detach().numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["1"]["scale"], proj[1].weight.detach().numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["1"]["bias"], proj[1].bias.detach().numpy(), atol=1e-5, rtol=0)
  # The params did move (so the comparison is not vacuous), and the per-step losses and lrs agree.
  assert np.abs(np.asarray(got["0"]["kernel"]) - np.asarray(p0["0"]["kernel"])).max() > 1e-3
  with open(tmp_path / "metrics.jsonl") as fh:
    rows = [json.loads(line) for line in fh]
  assert [r["step"] for r in rows] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-4)
  np.testing.assert_allclose([r["lr"] for r in rows], [1e-3] * 3 + [0.5 * (1e-3 + 1e-5)] * 3, rtol=1e-12)

  # apply_projection is the forward the loss used.
  with torch.no_grad():
    ref = torch.nn.functional.normalize(ft + proj(ft), dim=-1).numpy()
  np.testing.assert_allclose(projection.apply_projection(ours, f), ref, atol=2e-5)


def test_stage3_matches_torch_and_keeps_epoch(tmp_path, mesh, data):
  f, text, _, y = data
  neg = text[C:]
  config = _stage3_config()
  kept = negatives.train_negative_features(config, f, y, neg, str(tmp_path), mesh)

  e = torch.nn.Parameter(torch.from_numpy(neg.copy()))
  opt = torch.optim.SGD([e], lr=2e-2, momentum=0.9, weight_decay=1e-5)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
  ft, yt = torch.from_numpy(f), torch.from_numpy(y).long()
  per_epoch = []
  for epoch in range(EPOCHS):
    for idx in _torch_batches(epoch, N, B, config.seed):
      logits = 100.0 * torch.nn.functional.normalize(ft[idx], dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
      loss = torch.nn.functional.cross_entropy(logits, yt[idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
    per_epoch.append(e.detach().numpy().copy())
    sched.step()

  np.testing.assert_allclose(kept, per_epoch[0], atol=1e-5, rtol=0)  # keep_epoch=1: after the first epoch
  assert np.abs(per_epoch[0] - neg).max() > 1e-3
  final = np.load(negatives.negatives_path(str(tmp_path), EPOCHS))
  np.testing.assert_allclose(final, per_epoch[1], atol=1e-5, rtol=0)


def _separable(seed, n, k, d, scale):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(k, d))
  labels = rng.integers(0, k, n)
  x = scale * (centers[labels] + 0.3 * rng.normal(size=(n, d)))
  return x.astype(np.float32), labels


def _epoch_losses(path, spe):
  with open(path) as fh:
    rows = [json.loads(line) for line in fh]
  losses = np.asarray([r["loss"] for r in rows])
  return losses.reshape(-1, spe).mean(axis=1)


def test_losses_fall_on_separable_data(tmp_path, mesh):
  # Stage 2: image clusters unrelated to the (random) text features; the projection must align them.
  x, y = _separable(1, 64, C + M, D, 1.0)
  text = np.random.default_rng(2).normal(size=(C + M, D)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  params = projection.train_projection(_stage2_config(epochs=4, lr=1e-2, eta_min=1e-4), x, y, text,
                            str(tmp_path / "s2"), mesh)
  e2 = _epoch_losses(tmp_path / "s2" / "metrics.jsonl", 8)
  assert e2[-1] < 0.2 * e2[0], e2
  assert (np.argmax(projection.apply_projection(params, x) @ text.T, -1) == y).mean() > 0.85

  # Stage 3: text features start random; images cluster around M centers.
  x, y = _separable(3, 64, M, D, 1.0)
  neg = np.random.default_rng(4).normal(size=(M, D)).astype(np.float32)
  out = negatives.train_negative_features(_stage3_config(epochs=4, keep_epoch=0), x, y, neg,
                                         str(tmp_path / "s3"), mesh)
  e3 = _epoch_losses(tmp_path / "s3" / "metrics.jsonl", 8)
  assert e3[-1] < 0.3 * e3[0], e3
  logits = negatives.stage3_logits(out, x)
  assert (np.argmax(logits, -1) == y).mean() > 0.9


_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ["SYNOOD_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    import numpy as np
    from synood_jax.train import projection
    from synood_jax import config as config_lib, parallel
    workdir, kill_at = sys.argv[1], int(sys.argv[2])
    d = np.load(os.path.join(workdir, "data.npz"))
    config = config_lib.stage2_config()
    config.update(batch_size=8, epochs=2, checkpoint_every=4, progress_every_secs=0.0)
    def on_step(step, row):
      print("step", step, flush=True)
      if step == kill_at:
        os.kill(os.getpid(), 9)
    params = projection.train_projection(config, d["f"], d["y"], d["text"], workdir, parallel.make_mesh(),
                                       on_step=on_step)
    np.savez(os.path.join(workdir, "final.npz"), **{"/".join(k): v for k, v in
             [(tuple(str(getattr(p, "key", p)) for p in path), np.asarray(leaf))
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]})
""")


def test_kill9_resume_matches_uninterrupted(tmp_path, mesh, data):
  f, text, y, _ = data
  ref = projection.train_projection(_stage2_config(), f, y, text, str(tmp_path / "ref"), mesh)

  work = tmp_path / "killed"
  work.mkdir()
  np.savez(work / "data.npz", f=f, y=y, text=text)
  script = tmp_path / "run.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
  first = subprocess.run([sys.executable, str(script), str(work), "5"], env=env, capture_output=True,
                         text=True, timeout=120)
  assert first.returncode == -9, first.stderr[-3000:]
  assert not (work / "final.npz").exists()
  ckpts = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
  assert ckpts and max(ckpts) == 4, ckpts   # step 5 was never saved: the rerun must redo it

  second = subprocess.run([sys.executable, str(script), str(work), "-1"], env=env, capture_output=True,
                          text=True, timeout=120)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.split() == ["step", "5", "step", "6"]  # resumed after the step-4 checkpoint
  got = np.load(work / "final.npz")
  for path, leaf in jax.tree_util.tree_flatten_with_path(ref)[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    np.testing.assert_allclose(got[key], leaf, atol=1e-6, rtol=0, err_msg=key)
  with open(work / "metrics.jsonl") as fh:
    assert [json.loads(line)["step"] for line in fh] == list(range(1, 7))

  # A finished run returns its final params without training again.
  again = projection.train_projection(_stage2_config(), f, y, text, str(work), mesh)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

  # A different data set in the same workdir is refused, naming the run file.
  with pytest.raises(ValueError, match="run.json"):
    projection.train_projection(_stage2_config(), f[:16], y[:16], text, str(work), mesh)


def test_data_order_and_padding():
  seen = []
  for step in range(6):
    idx, mask = loop.batch_indices(step, num_examples=N, batch_size=B, seed=0)
    seen.append(idx[mask > 0])
    assert idx.shape == (B,) and mask.sum() == (4 if step % 3 == 2 else 8)
  for epoch in range(2):
    rows = np.concatenate(seen[3 * epoch:3 * epoch + 3])
    assert sorted(rows.tolist()) == list(range(N))   # every example once per epoch, none dropped
  assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:]))  # reshuffled


def test_bad_batch_size_names_field(tmp_path, mesh, data):
  f, text, y, _ = data
  with pytest.raises(ValueError, match="config.batch_size"):
    projection.train_projection(_stage2_config(batch_size=12), f, y, text, str(tmp_path), mesh)


def test_progress_rate_and_eta():
  now = [100.0]
  logged = []
  p = Progress(10, initial=4, name="job", every_secs=5, log=logged.append, clock=lambda: now[0])
  now[0] += 2
  assert not p.update(2)           # 2 items in 2 s: 1/s, but under every_secs
  assert p.rate == pytest.approx(1.0) and p.eta_seconds == pytest.approx(4.0)
  now[0] += 4
  assert p.update(2, extra="loss 1.0")
  assert logged[-1] == "job: 8/10 (80.0%) 0.67 it/s, ETA 3s, elapsed 6s; loss 1.0"
  now[0] += 1
  assert p.update(2)               # the last item always logs
  assert "10/10 (100.0%)" in logged[-1] and "ETA 0s" in logged[-1]
  assert format_seconds(3725) == "1h02m05s" and format_seconds(float("inf")) == "?"
