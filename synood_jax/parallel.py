"""Device mesh, param sharding rules and global batches, in the big_vision manner.

A mesh has axes ('data', 'fsdp'); batches are sharded over both (every device sees its own rows),
params are replicated or FSDP-sharded by the first regex rule that matches their path.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension spans every device


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; a size of -1 takes every device the other axis leaves.

  Devices are laid out process by process, fsdp the inner axis: each process holds one contiguous
  block of every batch (what `global_batch` and `process_rows` rely on), and an fsdp group no larger
  than a host's devices stays within that host.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data, fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not use the {n} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Param sharding rules: (regex over 'a/b/kernel', tactic). First match wins; no match replicates.

def replicate(shape: Sequence[int], mesh: Mesh) -> P:
  del shape, mesh
  return P()


def fsdp(shape: Sequence[int], mesh: Mesh, min_size: int = 2**12) -> P | None:
  """Shard the largest dimension divisible by the fsdp axis size; small: replicate; a large one with
  no divisible dimension: None (the caller replicates it and says so)."""
  n = mesh.shape["fsdp"]
  if n == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return None


TACTICS = {"replicate": replicate, "fsdp": fsdp}
DEFAULT_RULES = ((".*", "fsdp"),)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _compile_rules(rules) -> list:
  compiled = []
  for rule in rules:
    regex, tactic = rule
    if isinstance(tactic, str) and tactic not in TACTICS:
      raise ValueError(f"sharding rule {tuple(rule)!r}: unknown tactic {tactic!r}; known: {sorted(TACTICS)}")
    compiled.append((re.compile(regex), TACTICS[tactic] if isinstance(tactic, str) else tactic))
  return compiled


def param_shardings(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """A NamedSharding for each leaf of `params` (arrays or ShapeDtypeStructs).

  Leaves a rule wants sharded but cannot (no dimension divisible by the axis) are replicated, and
  listed once in the log, as big_vision does: they cost memory on every device.
  """
  compiled = _compile_rules(rules)
  unsharded = []

  def one(path, leaf):
    name = _path_str(path)
    for regex, tactic in compiled:
      if regex.fullmatch(name):
        spec = tactic(np.shape(leaf), mesh)
        if spec is None:
          unsharded.append(f"{name}{tuple(np.shape(leaf))}")
          spec = P()
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  out = jax.tree_util.tree_map_with_path(one, params)
  if unsharded:
    logging.warning("sharding: %d param(s) replicated, no dimension divisible by the mesh axis: %s",
                    len(unsharded), ", ".join(unsharded[:10]) + (" ..." if len(unsharded) > 10 else ""))
  return out


def map_rows(fn, x: jax.Array, chunk: int):
  """fn over `chunk` rows of x at a time (lax.map), its outputs (arrays with a leading row axis) back in
  row order; chunk 0 or >= rows: one call. Chunk j takes rows j, j + n, j + 2n, ... (n = rows / chunk), so
  a batch laid out in contiguous blocks over the devices gives every device its share of each chunk and
  the loop runs on all of them at once, not on one device after another."""
  b = x.shape[0]
  if not chunk or chunk >= b:
    return fn(x)
  if b % chunk:
    raise ValueError(f"decode_chunk={chunk} does not divide the batch of {b} rows; choose a divisor of "
                     "synthesis.batch_size (or 0 for the whole batch at once)")
  n = b // chunk
  strided = jnp.swapaxes(x.reshape((chunk, n) + x.shape[1:]), 0, 1)   # [n, chunk, ...]
  out = jax.lax.map(fn, strided)
  return jax.tree_util.tree_map(lambda y: jnp.swapaxes(y, 0, 1).reshape((b,) + y.shape[2:]), out)


def shard_params(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  return jax.device_put(params, param_shardings(params, mesh, rules))


def place_params(params: Any, mesh: Mesh, rules=None) -> Any:
  """Leaves already on `mesh` stay exactly as placed (e.g. sharded by config.mesh.sharding_rules at load:
  no second copy, no other rules); the others are placed by `rules` (None: replicated)."""
  shardings = None if rules is None else param_shardings(params, mesh, rules)

  def place(x, s=None):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated(mesh) if s is None else s)
  return jax.tree_util.tree_map(place, params) if shardings is None else jax.tree_util.tree_map(
      place, params, shardings)


def shardings_of(params: Any) -> Any:
  """The sharding of each (placed) leaf: what a jitted program over these params takes them as."""
  return jax.tree_util.tree_map(lambda x: x.sharding, params)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim over every device, other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def ceil_div(n: int, d: int) -> int:
  return -(-n // d)


def round_up(n: int, multiple: int) -> int:
  """n rounded up to a multiple (e.g. of the devices, so every device gets equal rows)."""
  return ceil_div(n, multiple) * multiple


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Turn each host's local batch (numpy pytree, leading dim = local rows) into global arrays.

  Single host: a plain sharded device_put. Multi-host: every process passes its own rows and
  the result is one global array whose batch spans all hosts.
  """
  def one(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(one, local)


def process_rows(n: int) -> slice:
  """This process's rows of a global batch of `n` rows: the block its devices hold (a mesh lists the
  devices process by process, as `jax.devices()` does), `n / process_count` rows each."""
  per, rest = divmod(n, jax.process_count())
  if rest:
    raise ValueError(f"a global batch of {n} rows does not split over {jax.process_count()} processes")
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def host_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global batch (the inverse of `global_batch`), as numpy; every row on a
  single process. Resharded to the batch layout first, so each local device holds distinct rows."""
  if jax.process_count() == 1:
    return np.asarray(x)
  x = jax.device_put(x, batch_sharding(mesh, x.ndim))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Pad rows (repeating the last) up to a multiple; returns the padded array and the true count."""
  n = x.shape[0]
  pad = (-n) % multiple
  if pad:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
  return x, n


def to_host(x: Any) -> Any:
  """Fetch (possibly multi-host sharded) arrays to numpy on every process."""
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree_util.tree_map(np.asarray, x)

