"""The prepared accelerator run: SynOOD synthesis at SD-2 in-painting's full size, ours vs the official procedure.

Random full-size SD-2 in-painting (diffusers) and ResNet-50 (built on the machine), 512 px, K = 3, PNDM
20 steps x strength 0.6 (13 UNet calls), guidance 8, r = 10, m = -5, batch 16. Rows, each printed the moment
it is measured (a run cut short still reports), in this order:
  1. ours, bfloat16 networks (attention kernel per --attention, 'auto': cuDNN flash on a GPU);
  2. the official procedure in PyTorch float16 (diffusers' SDPA attention); 3. the same in float32;
  4. ours, float32 networks.
Before them: the lowered FLOPs per image (program_cost.py: StableHLO before XLA, so cuDNN/cuBLAS calls are
counted as the math they do) and, on a GPU, a parity check of the cuDNN attention against the XLA path. Beside
ours: compile seconds and compiled.memory_analysis() of each of the four programs. Shares of peak divide
the lowered FLOPs by the warm time. Last, a second process loads and compiles from the persistent compile
cache the first one filled, and reports its start.

  python benchmarks/gpu_synthesis.py               # one H200: budget 8 minutes, building the models included
  python benchmarks/gpu_synthesis.py --tiny        # the whole script on a CPU at the tiny preset (torch bf16)
  python benchmarks/gpu_synthesis.py --count_only  # lower at SD-2 size here, run nothing: "TFLOP per image: X"
  python benchmarks/gpu_synthesis.py --memory_only=update --batch=16 --decode_chunk=4   # compile, print memory
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import FLAGS  # noqa: E402
import program_cost  # noqa: E402
import synthesis_vs_reference as bench  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from synood_jax.demo import tiny_sd  # noqa: E402
from synood_jax.models import attention  # noqa: E402

flags.DEFINE_bool("tiny", False, "run at the tiny preset (a CPU check that the script works end to end)")
flags.DEFINE_bool("count_only", False, "lower the programs at SD-2 size and print the FLOPs; run nothing")
flags.DEFINE_list("memory_only", [], "compile these programs (start, sample, update, outcome) at SD-2 size for "
                  "--batch / --dtype / --decode_chunk on this backend and print their memory; run nothing")
flags.DEFINE_float("peak_tflops", 989.0, "the chip's dense bf16 peak (H200 SXM: 989)")
flags.DEFINE_enum("attention", "auto", list(attention.CHOICES), "our attention kernel")
flags.DEFINE_integer("decode_chunk", 4, "rows per step of the decoder and its gradient (0: the whole batch)")
flags.DEFINE_bool("second_process", True, "time a second process's start from the persistent compile cache")
flags.DEFINE_bool("start_child", False, "internal: load, compile from the cache, run one batch; print JSON")


def say(line: str = "") -> None:
  print(line, flush=True)


def sd2_pipeline(dtype, attention_kernel: str = "xla"):
  text = dict(tiny_sd.TINY_TEXT_CONFIG, **common.SD2_TEXT, vocab_size=49408)
  return program_cost.abstract_pipeline(common.SD2_INPAINT_UNET, common.SD2_VAE, text,
                                        tiny_sd.SD2_INPAINT_SCHEDULER, dtype, attention_kernel)


def sd2_flops(batch: int) -> dict:
  return program_cost.flops_per_batch(*sd2_pipeline(jnp.bfloat16), batch, 512, FLAGS.steps, FLAGS.strength,
                                      FLAGS.iterations)


def folder_flops(folder: str, batch: int, image: int) -> dict:
  pipe, params, logits_fn = program_cost.abstract_pipeline(*program_cost.folder_configs(folder), jnp.float32)
  return program_cost.flops_per_batch(pipe, params, logits_fn, batch, image, FLAGS.steps, FLAGS.strength,
                                      FLAGS.iterations)


def attention_parity() -> str:
  """cuDNN flash attention vs the XLA path at SD-2's 64x64 self-attention (bf16, 32 rows x 5 heads)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((32, 4096, 5, 64)), jnp.bfloat16) for _ in range(3))
  fused = jax.jit(lambda *a: attention.attention(*a, kernel=FLAGS.attention))(q, k, v)
  plain = jax.jit(lambda *a: attention.attention(*a, kernel="xla"))(q, k, v)
  err = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - plain.astype(jnp.float32))))
  scale = float(jnp.max(jnp.abs(plain.astype(jnp.float32))))
  kernel = attention.resolve(FLAGS.attention, q, k)
  return f"  attention check: {kernel} vs xla at [32, 4096, 5, 64] bf16: max |diff| {err:.2e} (max |xla| {scale:.2f})"


def measure_ours(name: str, folder: str, resnet_path: str, dtype, inputs, flops: dict, peak: float) -> float:
  start = time.perf_counter()
  ours = bench.Ours(folder, resnet_path, dtype=dtype, iterations=FLAGS.iterations, attention=FLAGS.attention,
                    decode_chunk=FLAGS.decode_chunk)
  loaded = time.perf_counter()
  parts = ours.compile(*inputs)
  for line in program_cost.memory_lines(ours.program):
    say(line)
  warm = float(np.median([common.timed(lambda: ours.run(*inputs))[1] for _ in range(FLAGS.repeats)]))
  rate = flops["total"] / warm
  say(f"  {name:32s} {warm:9.3f} {FLAGS.batch / warm:9.3f}   {rate / 1e12:6.1f} TFLOP/s = {100 * rate / peak:5.1f}% "
      f"of peak; load {loaded - start:.1f} s, compile {parts['total_s']:.1f} s (lower {parts['lower_s']:.1f} s)")
  return warm


def measure_official(name: str, folder: str, resnet_path: str, dtype: str, inputs, flops: dict, peak: float):
  import torch
  FLAGS.torch_dtype = dtype
  official = bench.Official(folder, resnet_path)
  sources, prompts, _ = inputs
  first = common.timed(lambda: official.run(sources, prompts))[1]
  warm = float(np.median([common.timed(lambda: official.run(sources, prompts))[1] for _ in range(FLAGS.repeats)]))
  rate = flops["total"] / warm
  say(f"  {name:32s} {warm:9.3f} {FLAGS.batch / warm:9.3f}   {rate / 1e12:6.1f} TFLOP/s = {100 * rate / peak:5.1f}% "
      f"of peak; first call {first:.1f} s")
  del official
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return warm


def start_child() -> None:
  """A second process: load the models, compile (from the persistent cache), run one batch."""
  t0 = time.perf_counter()
  jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  inputs = bench.batch_inputs(FLAGS.batch, common.image_size() if FLAGS.tiny else 512)
  ours = bench.Ours(FLAGS.folder, FLAGS.resnet, dtype=jnp.bfloat16, iterations=FLAGS.iterations,
                    attention=FLAGS.attention, decode_chunk=FLAGS.decode_chunk)
  t1 = time.perf_counter()
  parts = ours.compile(*inputs)
  t2 = time.perf_counter()
  jax.block_until_ready(ours.run(*inputs))
  print(json.dumps({"import_load_s": t1 - t0, "compile_s": parts["total_s"], "first_batch_s": time.perf_counter() - t2,
                    "start_s": t2 - t0}))


def main(argv):
  del argv
  if FLAGS.tiny:
    FLAGS.preset = "tiny"
    common.apply_preset()
  elif not FLAGS["batch"].present:
    FLAGS.batch = 16
  if FLAGS.start_child:
    return start_child()
  if FLAGS.memory_only:
    start = time.perf_counter()
    lines = program_cost.compiled_memory(*sd2_pipeline(jnp.dtype(FLAGS.dtype), FLAGS.attention), FLAGS.batch, 512,
                                         FLAGS.steps, FLAGS.iterations, FLAGS.decode_chunk, FLAGS.memory_only)
    say(f"gpu_synthesis --memory_only: SD-2 in-painting at 512 px, batch {FLAGS.batch}, {FLAGS.dtype} networks, "
        f"decode_chunk {FLAGS.decode_chunk}, on {jax.devices()[0].platform}, compiled in "
        f"{time.perf_counter() - start:.0f} s (nothing run)")
    for line in lines:
      say(line)
    return None
  if FLAGS.count_only:
    start = time.perf_counter()
    flops = sd2_flops(FLAGS.batch)
    say(f"gpu_synthesis --count_only: SD-2 in-painting at 512 px, batch {FLAGS.batch}, K={FLAGS.iterations}, "
        f"lowered on {jax.devices()[0].platform} in {time.perf_counter() - start:.0f} s (nothing run)")
    for line in program_cost.flops_lines(flops, FLAGS.batch):
      say(line)
    return None
  import torch
  cuda = torch.cuda.is_available()
  low = "float16" if cuda else "bfloat16"  # CPU torch has no float16 convolutions
  cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix="gpu_synthesis_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  tmp = tempfile.mkdtemp(prefix="gpu_synthesis_")
  start = time.perf_counter()
  folder, image, resnet_path = bench.build(tmp, sd2=not FLAGS.tiny)
  B, peak = FLAGS.batch, FLAGS.peak_tflops * 1e12
  say(f"gpu_synthesis: built {'the tiny' if FLAGS.tiny else 'a random full-size SD-2 in-painting'} pipeline and "
      f"ResNet-50 in {time.perf_counter() - start:.0f} s; {image} px, batch {B}, K={FLAGS.iterations}, "
      f"attention {FLAGS.attention}, decode_chunk {FLAGS.decode_chunk}")
  say("\n".join(common.device_lines()))
  flops = folder_flops(folder, B, image)
  for line in program_cost.flops_lines(flops, B):
    say(line)
  if jax.devices()[0].platform == "gpu":
    say(attention_parity())
  inputs = bench.batch_inputs(B, image)
  say(f"  {'side':32s} {'s / batch':>9s} {'images/s':>9s}   notes (peak {FLAGS.peak_tflops:.0f} TFLOP/s dense bf16"
      + ("" if cuda else "; on a CPU the shares mean nothing") + ")")
  t = {}
  t["ours bf16"] = measure_ours("ours (bfloat16 networks)", folder, resnet_path, jnp.bfloat16, inputs, flops, peak)
  t["official low"] = measure_official(f"official (torch {low})", folder, resnet_path, low, inputs, flops, peak)
  say(f"  ours bf16 / official {low}: {t['official low'] / t['ours bf16']:.2f}x")
  t["official fp32"] = measure_official("official (torch float32)", folder, resnet_path, "float32", inputs, flops, peak)
  t["ours fp32"] = measure_ours("ours (float32 networks)", folder, resnet_path, jnp.float32, inputs, flops, peak)
  say(f"  ours fp32 / official fp32: {t['official fp32'] / t['ours fp32']:.2f}x; ours bf16 / official fp32: "
      f"{t['official fp32'] / t['ours bf16']:.2f}x")
  say(f"  at this pace 50,000 images take {50000 / (B / t['ours bf16']) / 3600:.2f} h (ours bf16) vs "
      f"{50000 / (B / t['official low']) / 3600:.2f} h (official {low})")
  if FLAGS.second_process:
    args = [f"--folder={folder}", f"--resnet={resnet_path}", f"--batch={B}", f"--cache_dir={cache}",
            f"--attention={FLAGS.attention}", f"--decode_chunk={FLAGS.decode_chunk}", "--start_child"]
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args, *(["--tiny"] if FLAGS.tiny else [])],
                         capture_output=True, text=True, check=False)
    line = (res.stdout.strip().splitlines() or ["{}"])[-1]
    say(f"  second process from the compile cache (bf16): {line}" if res.returncode == 0 else
        f"  second process failed: {res.stderr.strip().splitlines()[-1:] }")
  return None


if __name__ == "__main__":
  app.run(main)
