"""SynOOD stage-1 synthesis: our per-batch program vs the official PyTorch procedure, same run, same models.

Reference: `official_loop` of tests/test_synthesis.py, the official `generate_near_ood_sample.py` loop on
diffusers' StableDiffusionInpaintPipeline (which agrees with the official modified pipeline given
identical latents), with a random torchvision-layout ResNet-50 and its transforms. Per batch: VAE-encode
the sources and sample the posterior, draw eps; then K times: z_t = add_noise(z_in, eps, t0); under
no_grad pipe(..., masked_image_latents=<the all-zero image in PIXEL space, encoded and sampled by the
pipeline on every call>, latents=z_t, output_type='latent'); with grad: decode z0 / scale, ResNet-50,
L = mean((m - s)^2), backward (parameters keep requires_grad, as in the official code), eps -= r dL/du,
the last update included. torch runs with OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy
its threads burn CPU while waiting, and under load from other processes its UNet call ran about 5x
slower, which would flatter ours.
Ours: `synthesize.batch_program` (explicit shardings, donated source images) called as
`synthesize.synthesize` calls it: host tokenization per batch, the masked-image latents computed once,
outputs fetched to the host; without the image/manifest writing (neither side's file IO is timed).

Warm: each side's first call, then --repeats warm calls interleaved (torch, ours, torch, ours, ...); the
1-minute load average is printed beside each timing, and a warning when it says the CPU was shared.
Cold (--cold): a fresh process per side that imports, loads the model folders, runs one batch and exits,
timed from outside; ours twice, first with an empty persistent compile cache, then with it warm.

  python benchmarks/synthesis_vs_reference.py --preset=tiny --cold      # 64 px
  python benchmarks/synthesis_vs_reference.py --preset=small --cold     # 256 px, 32x32 latents
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts: before any import of it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (also puts the repository root on sys.path)
from common import FLAGS  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax import parallel  # noqa: E402
from synood_jax.diffusion import inpaint, pipeline, schedulers  # noqa: E402
from synood_jax.models import resnet  # noqa: E402
from synood_jax.synthesis import guidance, refinement, synthesize as synthesis  # noqa: E402

flags.DEFINE_integer("iterations", 3, "K refinement iterations")
flags.DEFINE_float("step_size", 10.0, "r")
flags.DEFINE_float("target", -5.0, "m")
flags.DEFINE_bool("cold", False, "also time a cold process per side (imports, loading, compile, one batch)")
flags.DEFINE_string("role", "", "internal: 'cold_ours' / 'cold_torch' run one batch in this process")
flags.DEFINE_string("folder", "", "internal: the pipeline folder of a cold run")
flags.DEFINE_string("resnet", "", "internal: the ResNet-50 state dict of a cold run")
flags.DEFINE_string("cache_dir", "", "internal: the compile cache of a cold run")


def batch_inputs(batch: int, image: int):
  """Source images NHWC in [-1, 1], the official prompt form, and stable source ids."""
  rng = np.random.default_rng(0)
  sources = rng.uniform(-1, 1, (batch, image, image, 3)).astype(np.float32)
  ids = np.array([synthesis.source_id(f"c/{i}.JPEG") for i in range(batch)], np.int32)
  return sources, common.prompts(batch), ids


class Ours:
  """Our per-batch program as `synthesize` builds and calls it."""

  def __init__(self, folder: str, resnet_path: str, dtype=jnp.float32, iterations: int = 3,
               hyper: refinement.Hyper | None = None):
    self.pipe, params = pipeline.load_inpaint_pipeline(folder, dtype=dtype)
    module, rparams = resnet.load_resnet(resnet_path, dtype=dtype)
    self.logits_fn, params["classifier"] = guidance.resnet50(module, rparams)
    self.mesh = parallel.make_mesh(devices=jax.devices()[:1])
    self.params, shardings = synthesis.place_params(params, self.mesh)
    self.cfg = refinement.RefineConfig(iterations=iterations)
    self.program = synthesis.batch_program(self.pipe, self.cfg, FLAGS.steps, None, self.logits_fn, self.mesh,
                                           shardings)
    self.image = None
    self.hyper = hyper or refinement.Hyper.make(FLAGS.step_size, FLAGS.target, FLAGS.batch)

  def args(self, sources, prompts, ids, seed: int = 0):
    pipe, image = self.pipe, sources.shape[1]
    if self.image != image:
      self.masked = synthesis.masked_image_latents(pipe, self.params["vae"], image)
      self.negative_ids = jnp.asarray(pipe.tokenize([""]))
      self.image = image
    prompt_ids = np.asarray(pipe.tokenize(prompts))
    return (self.params, *parallel.global_batch((sources, ids, prompt_ids), self.mesh), self.negative_ids,
            self.masked, np.int32(inpaint.start_index(pipe.scheduler, FLAGS.steps, FLAGS.strength)),
            np.float32(FLAGS.guidance), self.hyper, np.uint32(seed))

  def compile(self, sources, prompts, ids) -> dict:
    """Compile ahead (as synthesize does); returns the seconds of each part: building the arguments
    (masked-image latents, tokens), tracing and lowering, and compiling (or loading from the cache)."""
    t0 = time.perf_counter()
    args = self.args(sources, prompts, ids)
    t1 = time.perf_counter()
    lowered = self.program.lower(*args)
    t2 = time.perf_counter()
    self.program = lowered.compile()
    t3 = time.perf_counter()
    return {"args_s": t1 - t0, "lower_s": t2 - t1, "xla_s": t3 - t2, "total_s": t3 - t0}

  def run(self, sources, prompts, ids, seed: int = 0):
    out, scores, losses, _, _ = self.program(*self.args(sources, prompts, ids, seed))
    return parallel.to_host((out, scores, losses))


class Official:
  """The official procedure in PyTorch (tests/test_synthesis.official_loop)."""

  def __init__(self, folder: str, resnet_path: str):
    import torch
    sys.path.insert(0, os.path.join(common.ROOT, "tests"))
    from test_resnet import _random_resnet  # pylint: disable=import-outside-toplevel
    from test_synthesis import official_loop  # pylint: disable=import-outside-toplevel
    self.torch, self.loop, self.dev, self.dtype = torch, official_loop, common.torch_device(), common.torch_dtype()
    self.pipe = common.load_torch_pipeline(folder)
    model = _random_resnet((3, 4, 6, 3), 64, 1000, seed=0)
    model.load_state_dict(torch.load(resnet_path, map_location="cpu", weights_only=True))
    self.model = model.to(self.dev, self.dtype).eval()

  def run(self, sources, prompts, ids, seed: int = 0):
    del ids
    torch = self.torch
    x = common.nchw(sources).to(self.dev, self.dtype)
    b, _, h, w = x.shape
    gen = torch.Generator(device=self.dev).manual_seed(seed)
    with torch.no_grad():
      z_in = self.pipe.vae.encode(x).latent_dist.sample(gen) * self.pipe.vae.config.scaling_factor
      eps = torch.randn(z_in.shape, generator=gen, device=self.dev, dtype=self.dtype)
    masked_pixels = torch.zeros(b, 3, h, w, device=self.dev, dtype=self.dtype)  # encoded by the pipeline
    rows = self.loop(self.pipe, self.model, z_in, eps, masked_pixels, prompts, FLAGS.iterations, FLAGS.step_size,
                     FLAGS.target, steps=FLAGS.steps, strength=FLAGS.strength, guidance=FLAGS.guidance)
    common.sync(self.dev)
    return rows[-1]["images"].float().cpu().numpy(), torch.stack([r["scores"] for r in rows]).float().cpu().numpy()


def build(root: str, sd2: bool = False):
  """(pipeline folder, image size, ResNet-50 path): random models saved for both sides."""
  folder, image = common.make_torch_pipeline(root, sd2=sd2)
  resnet_path = os.path.join(root, "resnet50.pth")
  common.random_resnet50(resnet_path)
  return folder, image, resnet_path


def cold_child() -> None:
  """One batch in a fresh process; prints its own breakdown as JSON."""
  start = time.perf_counter()
  if FLAGS.role == "cold_ours":
    jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  image = FLAGS.latent_size * 2 ** (len(FLAGS.vae_channels) - 1)
  sources, prompts, ids = batch_inputs(FLAGS.batch, image)
  if FLAGS.role == "cold_ours":
    side = Ours(FLAGS.folder, FLAGS.resnet, iterations=FLAGS.iterations)
    loaded = time.perf_counter()
    parts = side.compile(sources, prompts, ids)
  else:
    side = Official(FLAGS.folder, FLAGS.resnet)
    loaded, parts = time.perf_counter(), {"total_s": 0.0}
  side.run(sources, prompts, ids)
  print(json.dumps(dict(parts, load_s=loaded - start, compile_s=parts["total_s"],
                        run_s=time.perf_counter() - loaded - parts["total_s"])))


def cold_runs(folder: str, resnet_path: str) -> list[tuple[str, float, dict, float]]:
  """torch, ours (empty compile cache), torch, ours (warm cache): (name, wall s, breakdown, load)."""
  cache = tempfile.mkdtemp(prefix="synthesis_cold_cache_")
  args = [f"--folder={folder}", f"--resnet={resnet_path}", f"--cache_dir={cache}", f"--batch={FLAGS.batch}",
          f"--iterations={FLAGS.iterations}", f"--steps={FLAGS.steps}", f"--strength={FLAGS.strength}",
          f"--guidance={FLAGS.guidance}", f"--step_size={FLAGS.step_size}", f"--target={FLAGS.target}",
          f"--latent_size={FLAGS.latent_size}", f"--vae_channels={','.join(FLAGS.vae_channels)}"]
  out = []
  for name, role in (("official (torch)", "cold_torch"), ("ours, empty compile cache", "cold_ours"),
                     ("official (torch)", "cold_torch"), ("ours, warm compile cache", "cold_ours")):
    start = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.abspath(__file__), f"--role={role}", *args], check=True,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    wall = time.perf_counter() - start
    out.append((name, wall, json.loads(res.stdout.strip().splitlines()[-1]), common.load_average()))
  return out


def main(argv):
  del argv
  common.apply_preset()
  if FLAGS.role:
    return cold_child()
  import torch

  tmp = tempfile.mkdtemp(prefix="synthesis_bench_")
  folder, image, resnet_path = build(tmp)
  B = FLAGS.batch
  sources, prompts, ids = batch_inputs(B, image)
  ours = Ours(folder, resnet_path, iterations=FLAGS.iterations)
  official = Official(folder, resnet_path)
  res = common.first_and_warm({"official (torch)": (lambda: official.run(sources, prompts, ids), None),
                               "ours": (lambda: ours.run(sources, prompts, ids), None)}, FLAGS.repeats)
  t_out, t_first, t_warm, t_all, t_loads = res["official (torch)"]
  (o_img, o_scores, _), o_first, o_warm, o_all, o_loads = res["ours"]

  kept = len(schedulers.get_timesteps(ours.pipe.scheduler, FLAGS.steps, FLAGS.strength)[0])
  print(f"synthesis_vs_reference ({FLAGS.preset or 'flags'}): {common.config_line(image)}; "
        "ResNet-50 guidance (resize 232, crop 224)")
  print(f"  batch {B}, K={FLAGS.iterations}, {FLAGS.steps} steps x strength {FLAGS.strength} ({kept} sampler "
        f"steps per iteration), guidance {FLAGS.guidance}, r={FLAGS.step_size}, m={FLAGS.target}, "
        f"reference batch {B}; fp32")
  print("\n".join(common.device_lines()) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
  print(f"  {'warm':26s} {'first call s':>13s} {'median s':>9s} {'images/s':>9s}   warm runs s (1-min load)")
  for name, first_s, warm_s, all_s, loads in (("official (torch)", t_first, t_warm, t_all, t_loads),
                                               ("ours", o_first, o_warm, o_all, o_loads)):
    runs = " ".join(f"{t:.2f} ({l:.1f})" for t, l in zip(all_s, loads["warm"]))
    print(f"  {name:26s} {first_s:9.2f} ({loads['first']:.1f}) {warm_s:9.2f} {B / warm_s:9.3f}   {runs}")
  print(f"  our compile time (first call - warm median): {o_first - o_warm:.1f} s")
  print(f"  ours / official, warm (images/s):          {t_warm / o_warm:.2f}x")
  print(f"  ours / official, first call incl. compile: {t_first / o_first:.2f}x")
  loads = [t_loads["first"], o_loads["first"], *t_loads["warm"], *o_loads["warm"]]
  if FLAGS.cold:
    cold = cold_runs(folder, resnet_path)
    print(f"  {'cold process (one batch)':26s} {'wall s':>9s} {'load+import s':>14s} {'compile s':>10s} {'run s':>7s}  1-min load")
    for name, wall, parts, load in cold:
      split = (f"  (arguments {parts['args_s']:.1f}, trace+lower {parts['lower_s']:.1f}, XLA {parts['xla_s']:.1f})"
               if "xla_s" in parts else "")
      print(f"  {name:26s} {wall:9.1f} {parts['load_s']:14.1f} {parts['compile_s']:10.1f} {parts['run_s']:7.1f}  "
            f"{load:.1f}{split}")
    torch_cold = np.mean([c[1] for c in cold if c[0].startswith("official")])
    print(f"  ours / official, cold process: {torch_cold / cold[1][1]:.2f}x (empty compile cache), "
          f"{torch_cold / cold[3][1]:.2f}x (warm compile cache)")
    loads += [c[3] for c in cold]
  warning = common.load_warning(loads)
  if warning:
    print(warning)
  ok = np.isfinite(o_img).all() and np.isfinite(t_out[0]).all()
  print(f"  outputs finite: {ok}; shapes ours {o_img.shape} official {t_out[0].shape[:1] + t_out[0].shape[2:]}x3; "
        f"scores per iteration, image 0: ours {' '.join(f'{v:.3f}' for v in o_scores[:, 0])}, official "
        f"{' '.join(f'{v:.3f}' for v in t_out[1][:, 0])} (other random draws; equality is tests/test_synthesis.py's)")
  del torch


if __name__ == "__main__":
  app.run(main)
