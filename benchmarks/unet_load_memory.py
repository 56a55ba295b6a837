"""Peak host memory of loading SD-2 in-painting's UNet (a full-size random one) with our loader.

Builds diffusers' UNet2DConditionModel from the SD-2-in-painting config (written out in torch_pipeline.py), saves
it with save_pretrained (one 3.4 GB float32 safetensors file), then loads it in a fresh subprocess per
loader and reports that process's peak resident memory (ru_maxrss) against the file size:
  lazy  - `unet.load` as it is: each tensor read, converted and placed before the next;
  eager - what the loader did before: the whole state dict read, then converted copies, then device
          copies.
The baseline (RSS after imports, before loading) is reported apart; the ratio is (peak - baseline) /
file size. Target: <= 1.5.

  python benchmarks/unet_load_memory.py                     # ~2 min, needs ~4 GB of /tmp and ~12 GB RAM
  python benchmarks/unet_load_memory.py --folder=/models/stable-diffusion-2-inpainting/unet
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import torch_pipeline as tp  # noqa: E402

from absl import app, flags  # noqa: E402

_FOLDER = flags.DEFINE_string("folder", "", "an existing diffusers UNet folder; empty: build a random SD-2 one")
_LOADERS = flags.DEFINE_list("loaders", ["lazy", "eager"], "loaders to measure, each in its own process")

_CHILD = r"""
import json, os, resource, sys
import jax, jax.numpy as jnp
import timing
from synood_jax.models import checkpoint_io, unet
def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
folder, loader = sys.argv[1], sys.argv[2]
jax.numpy.zeros(1).block_until_ready()
base = rss()
def load():
  if loader == "lazy":
    return unet.load(folder)[1]
  module = unet.build(checkpoint_io.read_config(folder))
  state, source = checkpoint_io.load_state_dict(folder)
  state = {k: state[k] for k in state}
  params = checkpoint_io.state_dict_to_params(state, unet.param_shapes(module), source)
  return jax.tree_util.tree_map(jnp.asarray, params)
params, seconds, _, _ = timing.timed(load, jax.block_until_ready)
n = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(json.dumps(dict(base=base, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, now=rss(),
                      params=int(n), seconds=seconds)))
"""


def build_unet(folder: str) -> str:
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**tp.SD2_INPAINT_UNET)
  model.save_pretrained(folder, safe_serialization=True)
  del model
  return folder


def main(argv):
  del argv
  folder = _FOLDER.value or build_unet(os.path.join(tempfile.mkdtemp(prefix="sd2_unet_"), "unet"))
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
  gib = lambda b: b / 2**30
  print(f"unet_load_memory: {folder}: weight file(s) {gib(size):.2f} GiB")
  print(f"  {'loader':6s} {'baseline GiB':>12s} {'peak GiB':>9s} {'(peak - baseline) / file':>25s} {'after GiB':>9s} {'s':>6s}")
  path = os.pathsep.join([common.ROOT, os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  for loader in _LOADERS.value:
    out = subprocess.run([sys.executable, "-c", _CHILD, folder, loader], env=env, check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"  {loader:6s} {gib(r['base']):12.2f} {gib(r['peak']):9.2f} {(r['peak'] - r['base']) / size:25.2f} "
          f"{gib(r['now']):9.2f} {r['seconds']:6.1f}   ({r['params'] / 1e6:.0f} M params)")


if __name__ == "__main__":
  app.run(main)
