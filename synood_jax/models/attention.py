"""Scaled dot-product attention for every model here (UNet, VAE mid-block, CLIP), one kernel per platform.

out = softmax(q k^T / sqrt(d) + causal mask) v   over q, k, v [B, T, heads, d]; logits and softmax statistics
in float32 whatever the compute dtype (diffusers' upcast_attention / upcast_softmax).

Kernels (`KERNELS`: adding one is one function and one registry line):
  xla         two matmuls with float32 logits materialised as [B, heads, Tq, Tk]; runs everywhere.
  xla_loop    the same math one (row, head) pair and up to 1024 queries at a time in a loop, so each
              [Tq, Tk] block of logits stays in the CPU's cache; the softmax is normalised after the second
              matmul. For CPUs, calls with at least 1024 queries (SD's 64x64 and 32x32 levels, the VAE
              mid-block); smaller ones run faster batched, on xla.
  cudnn       cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`): fused, float32
              softmax statistics inside the kernel; bf16/fp16, head dim a multiple of 8 up to 256 (128 before
              Hopper), and even sequence lengths (its backward pass refuses odd ones, e.g. 77 text tokens).
  pallas_tpu  the Pallas TPU flash-attention kernel, float32 statistics inside; sequence lengths multiples
              of 128 (its key blocks are lane-aligned).
`kernel="auto"` picks per backend: cudnn on GPU, pallas_tpu on TPU, xla_loop on CPU. A call the chosen kernel
cannot take (cross-attention over 77 text tokens, the VAE's 512-wide single head on cuDNN, fp32 on cuDNN)
runs on xla: the big self-attentions at 4096 tokens are the ones that need fusing, and they fit every kernel.
The Pallas and loop kernels run per device over the batch axes of the mesh set with `jax.set_mesh` (the synthesis
programs set it); cuDNN's call is partitioned by jax itself.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from synood_jax.parallel import BATCH_AXES

CHOICES = ("auto", "xla", "xla_loop", "cudnn", "pallas_tpu")
AUTO = {"cpu": "xla_loop", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "tpu": "pallas_tpu"}
LOOP_MIN_QUERIES = 1024  # below this the batched xla path measured as fast or faster on a CPU


def xla_attention(q, k, v, causal: bool = False):
  """The plain path. Heads move next to the batch before the two matmuls: on CPU this layout ran 1.6x
  faster than `jax.nn.dot_product_attention`'s XLA path (76 vs 124 ms at 1024 tokens x 8 heads, batch 4)."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, heads, T, d]
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if causal:
    tq, tk = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((tq, tk), bool)), logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.matmul(weights, v), 1, 2)


def xla_loop_attention(q, k, v, causal: bool = False):
  """The XLA math in a loop over (row, head) pairs and query blocks of up to 1024. The batched path writes
  and rereads all of [B, heads, Tq, Tk] several times (logits, max, exp, sum, weights): at SD's 32x32
  level, 8 heads, batch 4, that is 128 MB per call, far beyond a CPU's cache. One block is 4 MB.
  out = (exp(l - max l) v) / sum exp(l - max l): normalising the [Tq, d] output instead of the [Tq, Tk]
  weights saves a pass over the block (and about a third of the gradient's time)."""
  b, tq, heads, d = q.shape
  tk = k.shape[1]
  block = LOOP_MIN_QUERIES if tq > LOOP_MIN_QUERIES and tq % LOOP_MIN_QUERIES == 0 else tq
  qs = jnp.swapaxes(q, 1, 2).reshape(b * heads, tq // block, block, d)
  ks, vs = (jnp.swapaxes(t, 1, 2).reshape(b * heads, tk, d) for t in (k, v))

  def one_block(q_block, k_pair, v_pair, first_query):
    logits = jnp.matmul(q_block, k_pair.T, preferred_element_type=jnp.float32) * d ** -0.5
    if causal:
      rows = first_query + jnp.arange(block)[:, None]
      logits = jnp.where(jnp.arange(tk)[None, :] <= rows, logits, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.matmul(weights.astype(v_pair.dtype), v_pair, preferred_element_type=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(v_pair.dtype)

  def one_pair(args):
    q_pair, k_pair, v_pair = args
    starts = jnp.arange(q_pair.shape[0]) * block
    return jax.lax.map(lambda a: one_block(a[0], k_pair, v_pair, a[1]), (q_pair, starts))

  out = jax.lax.map(one_pair, (qs, ks, vs))
  return jnp.swapaxes(out.reshape(b, heads, tq, d), 1, 2)


def xla_loop_refusal(q, k, causal: bool) -> str | None:
  del k, causal
  if q.shape[1] < LOOP_MIN_QUERIES:
    return f"{q.shape[1]} queries (the loop pays off from {LOOP_MIN_QUERIES})"
  return None


def cudnn_attention(q, k, v, causal: bool = False):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _cudnn_head_max() -> int:
  """cuDNN's flash attention takes head dims up to 256 on Hopper and later, 128 before."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is None:
    return 256  # lowering for a GPU from another host: assume the H100/H200 this path is tuned for
  return 256 if tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0) else 128


def cudnn_refusal(q, k, causal: bool) -> str | None:
  del causal
  d, tq, tk = q.shape[-1], q.shape[1], k.shape[1]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)"
  if d % 8 or d > _cudnn_head_max():
    return f"head dim {d} (a multiple of 8 up to {_cudnn_head_max()})"
  if tq % 2 or tk % 2:
    return f"sequence lengths {tq} x {tk} (its backward pass needs even lengths)"
  return None


def _tpu_block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


def per_device(kernel: Callable, unsplit_warning: str | None = None) -> Callable:
  """`kernel` run on each device's rows (shard_map over the batch axes of the mesh set with
  `jax.set_mesh`). XLA cannot partition a Pallas call ("Mosaic kernels cannot be automatically
  partitioned"), so a sharded batch needs this; a loop over rows would otherwise loop over every
  device's rows in turn. `unsplit_warning` is logged once when several devices exist but no mesh context
  splits the rows."""
  def run(q, k, v, causal: bool = False):
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
    devices = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if devices == 1 or q.shape[0] % devices:
      if jax.device_count() > 1 and unsplit_warning:
        _warn_once(kernel.__name__, f"{q.shape[0]} rows outside a mesh context (jax.set_mesh) that splits them: "
                   + unsplit_warning)
      return kernel(q, k, v, causal)
    spec = P(axes)
    return jax.shard_map(functools.partial(kernel, causal=causal), in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)
  return run


def pallas_tpu_attention(q, k, v, causal: bool = False):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  bq, bk = _tpu_block(q.shape[1]), _tpu_block(k.shape[1])
  blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                         block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                         block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # the kernel takes [B, heads, T, d]
  out = fa.flash_attention(q, k, v, causal=causal, sm_scale=q.shape[-1] ** -0.5, block_sizes=blocks)
  return jnp.swapaxes(out, 1, 2)


def pallas_tpu_refusal(q, k, causal: bool) -> str | None:
  del causal
  tq, tk = q.shape[1], k.shape[1]
  if tq % 128 or tk % 128:
    return f"sequence lengths {tq} x {tk} (the TPU kernel takes multiples of 128)"
  return None


@dataclasses.dataclass(frozen=True)
class Kernel:
  run: Callable            # (q, k, v, causal) -> out, [B, T, heads, d]
  refusal: Callable        # (q, k, causal) -> None if it takes this call, else why not


KERNELS = {
    "xla": Kernel(xla_attention, lambda q, k, causal: None),
    "xla_loop": Kernel(per_device(xla_loop_attention), xla_loop_refusal),
    "cudnn": Kernel(cudnn_attention, cudnn_refusal),
    "pallas_tpu": Kernel(per_device(pallas_tpu_attention, "fine on one device; a batch sharded over several is "
                                    "refused by XLA, which cannot partition a Pallas call"), pallas_tpu_refusal),
}


def check_choice(name: str, where: str = "models.attention") -> str:
  if name not in CHOICES:
    raise ValueError(f"{where}={name!r} is not one of {CHOICES}")
  return name


def resolve(name: str, q, k, causal: bool = False) -> str:
  """The kernel that runs this call: `name` (or the backend's for "auto"), or xla where it refuses."""
  wanted = AUTO.get(jax.default_backend(), "xla") if check_choice(name) == "auto" else name
  why = KERNELS[wanted].refusal(q, k, causal)
  if why is None:
    return wanted
  if name != "auto":
    _warn_once(name, f"does not take {why}; that call runs on the xla kernel")
  return "xla"


@functools.lru_cache(maxsize=None)
def _warn_once(name: str, why: str) -> None:
  logging.warning("attention kernel %r: %s", name, why)


def attention(q, k, v, causal: bool = False, kernel: str = "auto"):
  """softmax(q k^T / sqrt(d)) v over [B, T, heads, d] with the kernel `resolve` picks (at trace time)."""
  return KERNELS[resolve(kernel, q, k, causal)].run(q, k, v, causal)
