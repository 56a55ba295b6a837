"""Stage-2 epoch time: cached CLIP image features vs running the image encoder on every batch.

The official `ind_ood_projection.py` runs CLIP's (frozen) image encoder on every batch of every epoch;
`synood_jax.train` trains on features encoded once. Measured in one run, same data order, same
projection, Adam and batch:
  - cache build: one encoding pass over the images (JAX, jitted, sharded over the devices);
  - one stage-2 epoch on cached features (JAX) and one encoding each batch first (JAX);
    printed ratio = encode-per-step / cached, and the same over `--epochs` epochs with the build included;
  - the PyTorch references: the cached epoch in torch (Linear-LayerNorm-ReLU, Adam), and, when
    transformers is installed, the official procedure (transformers CLIPModel image features per batch,
    then the projection step).

  python benchmarks/feature_cache.py                          # a tiny random CLIP made in a temp folder
  python benchmarks/feature_cache.py --vision_layers=12 --vision_width=768 --image_size=224 --patch_size=16
  python benchmarks/feature_cache.py --clip=/path/to/clip-vit-base-patch16 --num_images=4096

Image pixels are random (the timing does not depend on them). Step times exclude compilation (one
warm-up step per program) and checkpoint I/O.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the repository root on sys.path)
import timing  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax.training import train_state  # noqa: E402

from synood_jax import config as config_lib  # noqa: E402
from synood_jax import parallel  # noqa: E402
from synood_jax.demo import tiny_clip as tiny  # noqa: E402
from synood_jax.models import clip  # noqa: E402
from synood_jax.train import loop, projection  # noqa: E402

flags.DEFINE_string("clip", "", "a HF CLIP folder; empty: make a random tiny one (sizes below)")
flags.DEFINE_integer("vision_layers", 4, "tiny CLIP: vision transformer layers")
flags.DEFINE_integer("vision_width", 128, "tiny CLIP: vision hidden size (MLP 4x)")
flags.DEFINE_integer("vision_heads", 4, "tiny CLIP: attention heads")
flags.DEFINE_integer("image_size", 64, "tiny CLIP: image size")
flags.DEFINE_integer("patch_size", 8, "tiny CLIP: patch size")
flags.DEFINE_integer("projection_dim", 64, "tiny CLIP: feature size")
flags.DEFINE_integer("num_images", 1024, "images in the epoch")
flags.DEFINE_integer("batch_size", 128, "global batch (a multiple of the device count)")
flags.DEFINE_integer("num_text", 64, "text rows (ID classes + negatives) in the logits")
flags.DEFINE_integer("epochs", 3, "epochs for the amortised ratio (the official schedule has 3)")
flags.DEFINE_bool("torch_reference", True, "also time the PyTorch references")
flags.DEFINE_integer("repeats", 3, "each timing is the best of this many runs")
FLAGS = flags.FLAGS


def _clip_folder(tmp: str) -> str:
  if FLAGS.clip:
    return FLAGS.clip
  return tiny.make_tiny_clip(
      os.path.join(tmp, "tiny_clip"), seed=0, vision_num_hidden_layers=FLAGS.vision_layers,
      vision_hidden_size=FLAGS.vision_width, vision_intermediate_size=4 * FLAGS.vision_width,
      vision_num_attention_heads=FLAGS.vision_heads, vision_image_size=FLAGS.image_size,
      vision_patch_size=FLAGS.patch_size, projection_dim=FLAGS.projection_dim)


def _batches(n: int, bs: int, seed: int):
  spe = loop.steps_per_epoch(n, bs)
  return [loop.batch_indices(s, num_examples=n, batch_size=bs, seed=seed) for s in range(spe)]


def _jax_epoch(step, state, batches, make_args):
  """(state, last metrics) after one epoch; time it with jax.block_until_ready as the sync."""
  metrics = None
  for idx, mask in batches:
    state, metrics = step(state, *make_args(idx, mask))
  return state, metrics


def main(argv):
  del argv
  tmp = tempfile.mkdtemp(prefix="feature_cache_")
  folder = _clip_folder(tmp)
  bundle = clip.from_pretrained(folder)
  vis = bundle.config.vision
  dim = bundle.config.projection_dim
  n, bs = FLAGS.num_images, FLAGS.batch_size
  mesh = parallel.make_mesh()
  if bs % parallel.batch_size_multiple(mesh):
    raise ValueError(f"--batch_size={bs} must be a multiple of the {parallel.batch_size_multiple(mesh)} devices")

  rng = np.random.default_rng(0)
  images = rng.uniform(-2, 2, (n, vis.image_size, vis.image_size, vis.num_channels)).astype(np.float32)
  labels = rng.integers(0, FLAGS.num_text, n).astype(np.int32)
  text = rng.normal(size=(FLAGS.num_text, dim)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)

  config = config_lib.stage2_config()
  config.batch_size = bs
  batches = _batches(n, bs, config.seed)
  spe = len(batches)
  tx = projection.stage2_optimizer(config, spe)
  loss_fn = projection.stage2_loss_fn(config)
  params0 = projection.init_projection(dim, config.seed)

  rules = loop.REPLICATE_ALL
  create = lambda p: train_state.TrainState.create(apply_fn=None, params=p, tx=tx)  # noqa: E731
  state_sh = parallel.param_shardings(jax.eval_shape(create, params0), mesh, rules)
  clip_params = parallel.shard_params(bundle.params, mesh, rules)
  clip_sh = parallel.param_shardings(clip_params, mesh, rules)
  consts = {"text": jax.device_put(text, parallel.replicated(mesh))}
  consts_sh = {"text": parallel.replicated(mesh)}
  rep = parallel.replicated(mesh)
  b1, b2, b4 = (parallel.batch_sharding(mesh, k) for k in (1, 2, 4))

  def fresh_state():
    return jax.jit(create, out_shardings=state_sh)(jax.device_put(params0, rep))

  def cached(state, consts, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, consts, batch)
    return state.apply_gradients(grads=grads), loss

  def encoding(state, clip_params, consts, batch):
    x = jax.lax.stop_gradient(bundle.encode_image(clip_params, batch["images"]))
    return cached(state, consts, {"x": x, "y": batch["y"], "mask": batch["mask"]})

  cached_step = jax.jit(cached, in_shardings=(state_sh, consts_sh, {"x": b2, "y": b1, "mask": b1}),
                        out_shardings=(state_sh, rep), donate_argnums=(0,))
  encoding_step = jax.jit(encoding, in_shardings=(state_sh, clip_sh, consts_sh,
                                                  {"images": b4, "y": b1, "mask": b1}),
                          out_shardings=(state_sh, rep), donate_argnums=(0,))
  encode = jax.jit(bundle.encode_image, in_shardings=(clip_sh, b4), out_shardings=b2)

  # Cache build: one pass (padded last batch), after a warm-up compile.
  padded, _ = parallel.pad_batch(images, bs)
  jax.block_until_ready(encode(clip_params, parallel.global_batch(padded[:bs], mesh)))

  def build():
    feats = [encode(clip_params, parallel.global_batch(padded[i:i + bs], mesh))
             for i in range(0, len(padded), bs)]
    return np.concatenate([parallel.to_host(f) for f in feats])[:n]
  runs = timing.repeated(build, FLAGS.repeats)
  features, t_build = runs.result, runs.best

  cached_args = lambda idx, m: (consts, parallel.global_batch(  # noqa: E731
      {"x": features[idx], "y": labels[idx], "mask": m}, mesh))
  encoding_args = lambda idx, m: (clip_params, consts, parallel.global_batch(  # noqa: E731
      {"images": images[idx], "y": labels[idx], "mask": m}, mesh))
  jax.block_until_ready(_jax_epoch(cached_step, fresh_state(), batches[:1], cached_args))  # compile
  jax.block_until_ready(_jax_epoch(encoding_step, fresh_state(), batches[:1], encoding_args))  # compile

  def epochs(step, make_args):
    """(state after the last epoch, best seconds), each epoch from a fresh state made outside the timing."""
    runs = timing.repeated(lambda state: _jax_epoch(step, state, batches, make_args), FLAGS.repeats,
                           jax.block_until_ready, setup=lambda: jax.block_until_ready(fresh_state()))
    return runs.result[0], runs.best

  s_cached, t_cached = epochs(cached_step, cached_args)
  s_encoding, t_encoding = epochs(encoding_step, encoding_args)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(parallel.to_host(s_cached.params)),
      jax.tree_util.tree_leaves(parallel.to_host(s_encoding.params))))

  e = FLAGS.epochs
  print(f"feature_cache: {n} images {vis.image_size}px (patch {vis.patch_size}, {vis.num_hidden_layers} layers, "
        f"width {vis.hidden_size}, features {dim}), batch {bs}, {spe} steps/epoch, "
        f"{len(jax.devices())} x {jax.devices()[0].platform}")
  print(f"  cache build (one encoding pass):            {t_build:8.3f} s")
  print(f"  JAX epoch, cached features:                 {t_cached:8.3f} s")
  print(f"  JAX epoch, encoding each batch:             {t_encoding:8.3f} s")
  print(f"  ratio encode-per-step / cached, one epoch:  {t_encoding / t_cached:8.2f} x")
  print(f"  ratio over {e} epochs incl. cache build:      {e * t_encoding / (t_build + e * t_cached):8.2f} x")
  print(f"  params after one epoch, cached vs encoding: max |diff| {diff:.2e}")

  if FLAGS.torch_reference:
    _torch_reference(features, images, labels, text, batches, config, params0, t_cached, folder, e, t_build)


def _torch_reference(features, images, labels, text, batches, config, params0, t_cached, folder, e, t_build):
  import torch

  def make():
    d = features.shape[1]
    proj = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.LayerNorm(d), torch.nn.ReLU())
    p = params0["params"]
    with torch.no_grad():
      proj[0].weight.copy_(torch.tensor(np.asarray(p["0"]["kernel"]).T))
      proj[0].bias.copy_(torch.tensor(np.asarray(p["0"]["bias"])))
    opt = torch.optim.Adam(proj.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return proj, opt

  tt, yt = torch.from_numpy(text), torch.from_numpy(labels).long()

  def step(proj, opt, f, y):
    g = torch.nn.functional.normalize(f + proj(f), dim=-1)
    loss = torch.nn.functional.cross_entropy(config.logit_scale * g @ tt.T, y)
    opt.zero_grad()
    loss.backward()
    opt.step()

  # On a shared 2-core host torch's intra-op threads can be far slower than one thread (measured: a
  # 128x64 matmul 15 ms with 2 threads vs 0.02 ms with 1): each torch timing is its best over thread counts.
  thread_counts = sorted({1, torch.get_num_threads()})

  def best_over_threads(features_of):
    """(best seconds, its thread count) of an epoch, each from a fresh projection and optimizer that took
    one warm-up step (untimed)."""
    def setup():
      proj, opt = make()
      step(proj, opt, features_of(rows[0]), yt[rows[0]])  # warm-up
      return make()

    def epoch(proj_opt):
      for r in rows:
        step(*proj_opt, features_of(r), yt[r])
    best = (float("inf"), 0)
    for nt in thread_counts:
      torch.set_num_threads(nt)
      best = min(best, (timing.repeated(epoch, FLAGS.repeats, setup=setup).best, nt))
    return best

  rows = [torch.from_numpy(idx[m > 0]) for idx, m in batches]
  ft = torch.from_numpy(features)

  t_torch, nt = best_over_threads(lambda r: ft[r])
  print(f"  PyTorch epoch, cached features:             {t_torch:8.3f} s  "
        f"({nt} thread{'s' * (nt > 1)}; torch / JAX cached: {t_torch / t_cached:.2f} x)")

  try:
    import transformers
  except ImportError:
    print("  PyTorch official procedure: skipped (transformers not installed)")
    return
  model = transformers.CLIPModel.from_pretrained(folder).eval()
  it = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  def encode(x):
    with torch.no_grad():
      return model.visual_projection(model.vision_model(pixel_values=x).pooler_output).float()

  t_official, nt = best_over_threads(lambda r: encode(it[r]))
  print(f"  PyTorch epoch, official (encode per batch): {t_official:8.3f} s  "
        f"({nt} thread{'s' * (nt > 1)}; official / JAX cached: {t_official / t_cached:.2f} x; "
        f"over {e} epochs incl. cache build: {e * t_official / (t_build + e * t_cached):.2f} x)")


if __name__ == "__main__":
  app.run(main)
