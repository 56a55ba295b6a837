"""The attention kernels (models/attention.py) against torch's scaled_dot_product_attention, forward and
gradient: the XLA path on CPU, the Pallas TPU kernel in interpret mode at SD-2's attention shapes and as
lowered for a TPU, and the cuDNN path as lowered for a GPU (it cannot run without one)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synood_jax.models import attention, vae  # noqa: E402

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")


def _qkv(b, tq, tk, heads, d, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, tq, heads, d)).astype(np.float32)
  k = rng.standard_normal((b, tk, heads, d)).astype(np.float32)
  v = rng.standard_normal((b, tk, heads, d)).astype(np.float32)
  return tuple(jnp.asarray(t, dtype) for t in (q, k, v))


def _torch(q, k, v, causal, cotangent):
  """torch SDPA (math path, float64) on [B, T, heads, d]: (out, (dq, dk, dv)) for sum(out * cotangent)."""
  ts = [torch.tensor(np.asarray(t, np.float64).transpose(0, 2, 1, 3), requires_grad=True) for t in (q, k, v)]
  with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    out = torch.nn.functional.scaled_dot_product_attention(*ts, is_causal=causal)
  (out * torch.tensor(np.asarray(cotangent, np.float64).transpose(0, 2, 1, 3))).sum().backward()
  back = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)
  return back(out), tuple(back(t.grad) for t in ts)


def _rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _check(kernel, q, k, v, causal, tol):
  run = attention.KERNELS[kernel].run
  cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:1] + q.shape[1:2] + v.shape[2:]), q.dtype)
  out, pull = jax.vjp(lambda *a: run(*a, causal=causal), q, k, v)
  grads = pull(cot)
  ref_out, ref_grads = _torch(q, k, v, causal, cot)
  assert _rel(out, ref_out) <= tol, (kernel, "forward", _rel(out, ref_out))
  for name, g, r in zip("qkv", grads, ref_grads):
    assert _rel(g, r) <= tol, (kernel, f"d{name}", _rel(g, r))


@pytest.mark.parametrize("causal", [False, True])
def test_xla_kernel_matches_torch(causal):
  _check("xla", *_qkv(2, 77, 77, 4, 16), causal, 1e-5)       # CLIP text shape (causal), cross-attention
  _check("xla", *_qkv(2, 64, 77, 4, 16), False, 1e-5)


def test_xla_kernel_bfloat16_keeps_float32_softmax():
  q, k, v = _qkv(2, 256, 256, 2, 32, dtype=jnp.bfloat16)
  _check("xla", q, k, v, False, 2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_loop_kernel_matches_torch(causal):
  """The CPU kernel: 1024 queries (one block per row and head), 2048 (two blocks: the causal mask's
  offset per block), cross-attention over 77 keys, and the VAE mid-block's 128-wide single head."""
  _check("xla_loop", *_qkv(2, 1024, 1024, 3, 8), causal, 1e-5)
  _check("xla_loop", *_qkv(1, 2048, 2048, 2, 16), causal, 1e-5)
  _check("xla_loop", *_qkv(2, 1024, 77, 2, 8), False, 1e-5)
  _check("xla_loop", *_qkv(1, 1024, 1024, 1, 128), causal, 1e-5)
  _check("xla_loop", *_qkv(1, 1024, 1024, 2, 32, dtype=jnp.bfloat16), causal, 2e-2)


def test_pallas_tpu_kernel_at_sd2_shape_interpret_mode():
  """SD-2's 64x64 self-attention: 4096 tokens, head dim 64 (one head, batch 1: interpret mode is slow)."""
  q, k, v = _qkv(1, 4096, 4096, 1, 64)
  with pltpu.force_tpu_interpret_mode():
    _check("pallas_tpu", q, k, v, False, 1e-5)


def test_pallas_tpu_kernel_causal_and_bfloat16_interpret_mode():
  with pltpu.force_tpu_interpret_mode():
    _check("pallas_tpu", *_qkv(2, 256, 256, 2, 64), True, 1e-5)
    _check("pallas_tpu", *_qkv(1, 512, 1024, 2, 64, dtype=jnp.bfloat16), False, 2e-2)


def test_vae_decode_gradient_same_with_pallas_tpu_kernel():
  """The refinement differentiates through the VAE mid-block's attention: the decoder's input gradient
  with the Pallas kernel (interpret mode) equals the XLA path's."""
  cfg = dict(vae.TINY_VAE_CONFIG, block_out_channels=[32, 128])  # mid-block: 128-wide single head
  params = vae.init_params(cfg, jax.random.key(0))
  u = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 16, 4)), jnp.float32)  # 256 tokens

  def loss(module, x):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x, method=module.decode)))

  plain = jax.value_and_grad(lambda x: loss(vae.build(cfg, attention="xla"), x))(u)
  with pltpu.force_tpu_interpret_mode():
    fused = jax.value_and_grad(lambda x: loss(vae.build(cfg, attention="pallas_tpu"), x))(u)
  assert abs(float(fused[0]) - float(plain[0])) <= 1e-4 * abs(float(plain[0]))
  assert _rel(fused[1], plain[1]) <= 1e-4


def _custom_calls(exported) -> str:
  return " ".join(line.split("custom_call @")[1].split("(")[0]
                  for line in exported.mlir_module().splitlines() if "custom_call @" in line)


def test_pallas_tpu_path_lowers_for_tpu_forward_and_gradient():
  q, k, v = _qkv(2, 4096, 4096, 5, 64, dtype=jnp.bfloat16)
  f = lambda q, k, v: attention.attention(q, k, v, kernel="pallas_tpu")
  fwd = jax.export.export(jax.jit(f), platforms=["tpu"])(q, k, v)
  grad = jax.export.export(jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))),
                           platforms=["tpu"])(q, k, v)
  assert "tpu_custom_call" in _custom_calls(fwd)
  assert _custom_calls(grad).count("tpu_custom_call") >= 3  # forward + dq + dkv kernels


@pytest.fixture
def pretend_cudnn(monkeypatch):
  """Lowering for a GPU from this CPU: jax asks the local cuDNN for its version and the local GPU for
  its compute capability at trace time; answer as an H200 with cuDNN 9.10 would."""
  fas = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  for name in ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal"):
    if not hasattr(fas, name):
      pytest.skip(f"jax changed its cuDNN checks ({name} is gone)")
  monkeypatch.setattr(fas, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fas, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda capability: False)
  return [jax.export.DisabledSafetyCheck.custom_call(n) for n in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")]


@pytest.mark.parametrize("shape", [(2, 4096, 4096, 5, 64), (2, 1024, 1024, 10, 64), (2, 78, 78, 8, 64)])
def test_cudnn_path_lowers_for_gpu_forward_and_gradient(pretend_cudnn, shape):
  """SD-2's self-attention shapes go to cuDNN's fused kernel, its backward pass included."""
  q, k, v = _qkv(*shape, dtype=jnp.bfloat16)
  f = lambda q, k, v: attention.cudnn_attention(q, k, v, causal=shape[1] == 78)
  fwd = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=pretend_cudnn)(q, k, v)
  grad = jax.export.export(jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))),
                           platforms=["cuda"], disabled_checks=pretend_cudnn)(q, k, v)
  assert "__cudnn$fmhaSoftmax" in _custom_calls(fwd)
  assert "__cudnn$fmhaSoftmaxBackward" in _custom_calls(grad)


def test_calls_cudnn_refuses_are_the_ones_its_lowering_refuses(pretend_cudnn):
  """`cudnn_refusal` says no exactly where jax's cuDNN lowering raises (checked on its gradient)."""
  cases = [((2, 4096, 77, 5, 64), jnp.bfloat16), ((2, 197, 197, 12, 64), jnp.bfloat16),
           ((1, 4096, 4096, 1, 512), jnp.bfloat16), ((2, 256, 256, 2, 64), jnp.float32),
           ((2, 4096, 4096, 5, 64), jnp.bfloat16), ((2, 4096, 78, 5, 64), jnp.float16)]
  for shape, dtype in cases:
    q, k, v = _qkv(*shape, dtype=dtype)
    g = jax.grad(lambda *a: attention.cudnn_attention(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    try:
      jax.export.export(jax.jit(g), platforms=["cuda"], disabled_checks=pretend_cudnn)(q, k, v)
      lowered = True
    except (NotImplementedError, ValueError):
      lowered = False
    assert (attention.cudnn_refusal(q, k, False) is None) == lowered, (shape, dtype)


def test_resolve_per_backend_and_fallbacks(monkeypatch, caplog):
  q77, k77, _ = _qkv(1, 77, 77, 2, 64, dtype=jnp.bfloat16)
  q4k, k4k, _ = _qkv(1, 4096, 4096, 1, 64, dtype=jnp.bfloat16)
  assert attention.resolve("auto", q4k, k4k) == "xla_loop"                    # this CPU, 4096 queries
  assert attention.resolve("auto", q77, k77) == "xla"                        # few queries: batched
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", q4k, k4k) == "cudnn"
  assert attention.resolve("auto", q4k.astype(jnp.float32), k4k) == "xla"   # fp32 networks
  assert attention.resolve("auto", q77, k77) == "xla"                        # CLIP's 77 text tokens
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.resolve("auto", q4k, k4k) == "pallas_tpu"
  assert attention.resolve("auto", q4k, k77) == "xla"                        # cross-attention
  assert attention.resolve("xla", q4k, k4k) == "xla"
  with caplog.at_level("WARNING"):
    assert attention.resolve("pallas_tpu", q77, k77) == "xla"
  assert "77 x 77" in caplog.text
  with pytest.raises(ValueError, match="models.attention='flash'"):
    attention.resolve("flash", q4k, k4k)
  with pytest.raises(ValueError, match="models.attention"):
    vae.build(vae.TINY_VAE_CONFIG, attention="flash")


def test_pallas_kernel_runs_per_device_under_a_mesh():
  """XLA cannot partition a Pallas call: under `jax.set_mesh` the kernel runs on each device's rows
  (8 rows over 8 devices: the kernel sees 1), and the wrapper leaves the numbers as they are."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from synood_jax import parallel
  mesh = parallel.make_mesh(4, 2)
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  q, k, v = (jax.device_put(t, rows) for t in _qkv(8, 256, 256, 2, 64))
  with jax.set_mesh(mesh):
    wrapped = jax.jit(lambda *a: attention.per_device(attention.xla_attention)(*a), in_shardings=rows,
                      out_shardings=rows)(q, k, v)
    exported = jax.export.export(jax.jit(lambda *a: attention.attention(*a, kernel="pallas_tpu"),
                                         in_shardings=rows, out_shardings=rows), platforms=["tpu"])(q, k, v)
  assert _rel(wrapped, attention.xla_attention(q, k, v)) <= 1e-6
  q, k, v = (jax.device_put(t, rows) for t in _qkv(8, 1024, 1024, 2, 8))
  with jax.set_mesh(mesh):
    looped = jax.jit(lambda *a: attention.attention(*a, kernel="xla_loop"), in_shardings=rows,
                     out_shardings=rows)
    text = looped.lower(q, k, v).as_text()
    out = looped(q, k, v)
  assert "shard_map" in text or "manual" in text  # each device loops over its own rows only
  assert _rel(out, attention.xla_attention(q, k, v)) <= 1e-5
  calls = [line for line in exported.mlir_module().splitlines() if "tpu_custom_call" in line]
  assert calls and all("tensor<1x2x256x64xf32>" in line for line in calls), calls[:1]
