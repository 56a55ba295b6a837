"""Process setup shared by the launchers: the distributed runtime (first), compile cache, barriers.

Multi-host start-up happens here and only here. `jax.distributed.initialize` must run before anything
starts a backend (`jax.devices()`, `jax.process_count()`, creating an array), so `setup` calls it before
any other JAX call, once (`jax.distributed.is_initialized()` guards a second call). It runs when
`config.multi_host` is set (the cluster is auto-detected: Cloud TPU, Slurm, Open MPI, Kubernetes) or
when `config.distributed.coordinator_address` names an explicit cluster.

A bad cluster description ends in one error that names the config field, never in a silent hang:
- num_processes / process_id out of range: checked before connecting;
- nothing listening at coordinator_address (process 0 not started, wrong host or port): checked by a
  TCP probe for `initialization_timeout` seconds;
- the coordinator port already taken (a second process 0): checked before binding it;
- fewer processes than num_processes, or two with one process_id: the cluster does not form, and a
  watchdog ends the process after `initialization_timeout` seconds with that diagnosis (jax's own
  timeout aborts in C++ with a bare DEADLINE_EXCEEDED, so ours fires first);
- processes that disagree on num_processes / process_id: an all-gather right after start-up.
"""
from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import secrets
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import logging

from synood_jax import fileio

_EXIT_CODE = 3  # start-up watchdog


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _OwnInfoOnly(py_logging.Filter):
  """Keeps warnings and errors from anywhere, and info lines only from this repository's files
  (orbax logs about 20 INFO lines per checkpoint through absl, which would bury ours)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or os.path.abspath(record.pathname).startswith(_REPO + os.sep)


def quiet_library_logs() -> None:
  """Libraries' INFO lines (orbax, etils, ...) off unless --verbosity >= 1; ours stay."""
  handler = logging.get_absl_handler()
  if logging.get_verbosity() >= 1:
    return
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


def setup(config) -> None:
  """Distributed runtime (when asked, before anything else), then the persistent compilation cache, a
  log line; libraries' INFO logs off (--verbosity=1 shows them)."""
  start_distributed(config)
  quiet_library_logs()
  cache = config.get("compile_cache_dir", os.path.expanduser("~/.cache/synood_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  logging.info("JAX %s: process %d of %d, %d local / %d global device(s) (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


# ---------------------------------------------------------------------------------------------
# Start-up.

def _fields(config) -> tuple[str, int, int, int]:
  d = config.get("distributed") or {}
  return (str(d.get("coordinator_address", "") or ""), int(d.get("num_processes", -1)),
          int(d.get("process_id", -1)), int(d.get("initialization_timeout", 300)))


def start_distributed(config) -> bool:
  """jax.distributed.initialize from the config, before any backend starts; True if this job is
  (now) distributed. A no-op without multi_host or an explicit coordinator, or when already done."""
  address, num, pid, timeout = _fields(config)
  if not (config.get("multi_host", False) or address):
    return False
  if jax.distributed.is_initialized():
    return True
  _check_ranges(address, num, pid, timeout)
  if address and pid > 0:
    _wait_for_coordinator(address, timeout)
  if address and pid == 0:
    _check_port_free(address)
  kwargs = {k: v for k, v in (("coordinator_address", address), ("num_processes", num),
                              ("process_id", pid)) if v not in ("", -1)}
  logging.info("distributed: joining %s (config.distributed: %s; waiting up to %d s)",
               address or "the auto-detected cluster", kwargs or "auto-detect", timeout)
  start = time.perf_counter()
  try:
    with _deadline(timeout, _no_cluster_message(address, num, pid, timeout)):
      jax.distributed.initialize(initialization_timeout=timeout + 60, **kwargs)
  except (ValueError, RuntimeError) as e:  # e.g. nothing to auto-detect
    raise RuntimeError(f"jax.distributed.initialize failed: {e}. Outside Cloud TPU / Slurm / Open MPI / "
                       "Kubernetes, give config.distributed.coordinator_address, num_processes and "
                       "process_id") from e
  logging.info("distributed: process %d of %d joined in %.1f s; %d local device(s) of %d", jax.process_index(),
               jax.process_count(), time.perf_counter() - start, jax.local_device_count(), jax.device_count())
  _check_cluster(num, pid)
  return True


def _check_ranges(address: str, num: int, pid: int, timeout: int) -> None:
  if num != -1 and num < 1:
    raise ValueError(f"config.distributed.num_processes={num}: need >= 1 (or -1 to auto-detect)")
  if pid < -1 or (num >= 1 and pid >= num):
    raise ValueError(f"config.distributed.process_id={pid}: must be in [0, num_processes={num}) "
                     "(or -1 to auto-detect)")
  if timeout < 1:
    raise ValueError(f"config.distributed.initialization_timeout={timeout}: need >= 1 second")
  if address:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"config.distributed.coordinator_address={address!r}: expected 'host:port'")
    if num == -1 or pid == -1:
      raise ValueError("config.distributed.coordinator_address is set: give num_processes and process_id "
                       f"too (got num_processes={num}, process_id={pid})")


def _split(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Process 0 may start later than the others: probe its port until `timeout`, then name the field."""
  host, port = _split(address)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(f"config.distributed.coordinator_address={address!r}: nothing accepted a "
                           f"connection within {timeout} s ({e}); start process 0 with the same address, "
                           "and check the host and port are reachable from this host") from None
      time.sleep(0.5)


def _check_port_free(address: str) -> None:
  """Process 0 listens at the bind address (JAX_COORDINATOR_BIND_ADDRESS, else every interface)."""
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or f":{_split(address)[1]}"
  host, port = _split(bind)
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    try:
      s.bind((host, port))
    except OSError as e:
      raise RuntimeError(f"config.distributed.coordinator_address={address!r}: process 0 cannot listen on "
                         f"{bind} ({e}); is another process 0 running, or the port taken?") from None


def _no_cluster_message(address: str, num: int, pid: int, timeout: int) -> str:
  return (f"distributed start-up: the cluster did not form within {timeout} s "
          f"(config.distributed.initialization_timeout). This process: process_id={pid}, "
          f"num_processes={num}, coordinator_address={address or 'auto-detected'}. Check that exactly "
          "config.distributed.num_processes processes were started, each with its own "
          "config.distributed.process_id, all with the same config.distributed.coordinator_address.")


@contextlib.contextmanager
def _deadline(seconds: float, message: str):
  """Ends the process with `message` if the block is still running after `seconds` (the block is a
  C++ wait that Python cannot interrupt; it releases the GIL, so this thread runs)."""
  finished = threading.Event()

  def watch():
    if not finished.wait(seconds):
      logging.error("%s", message)  # a StreamHandler flushes every record: seen before the exit
      sys.stderr.flush()
      os._exit(_EXIT_CODE)

  threading.Thread(target=watch, daemon=True, name="synood-startup-deadline").start()
  try:
    yield
  finally:
    finished.set()


def _check_cluster(num: int, pid: int) -> None:
  """Every process's configured count / id against the cluster that formed (all raise the same error)."""
  from jax.experimental import multihost_utils
  rows = np.asarray(multihost_utils.process_allgather(np.array([num, pid, jax.process_index()], np.int32)))
  rows = rows.reshape(jax.process_count(), 3)
  bad = [f"process {int(i)} has num_processes={int(n)}" for n, _, i in rows if n != -1 and n != jax.process_count()]
  bad += [f"process {int(i)} has process_id={int(p)}" for _, p, i in rows if p != -1 and p != i]
  if bad:
    raise RuntimeError(f"config.distributed does not match the cluster of {jax.process_count()} processes: "
                       + "; ".join(bad))


@contextlib.contextmanager
def fail_fast():
  """Around a launcher's work: on several processes, an exception ends this process at once.

  Left to Python, a failed process would wait up to `shutdown_timeout` (300 s) at jax's shutdown
  barrier while the others wait for it inside a collective. Exiting closes its sockets, so a peer's
  next collective fails within seconds ('Connection closed by peer') and it ends the same way.
  """
  try:
    yield
  except BaseException:
    if jax.process_count() == 1:
      raise
    logging.exception("process %d failed; ending it now so that the other processes stop too",
                      jax.process_index())
    sys.stderr.flush()
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# Collectives between processes (no-ops on one process).

def barrier(name: str) -> None:
  """Every process waits here until all reached the barrier with the same name."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def agreed(value):
  """Process 0's value (a number, bool or numpy array of one shape everywhere) on every process:
  decisions that steer collectives (skip a stage, read a cache) must be the same on all of them."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  out = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
  return type(value)(out.item()) if isinstance(value, (bool, int, float)) else out


def gather_json(obj) -> list:
  """Every process's `obj` (anything JSON can hold), in process order: for results of uneven size,
  such as the unreadable files each process met."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  bufs = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(b[:n]).decode("utf-8")) for b, n in zip(bufs, sizes)]


def check_shared_dir(folder: str, field: str = "--workdir") -> None:
  """Every process must see the files process 0 writes in `folder`: process 0 writes a random token,
  the others read it back, and all raise the same error if one of them cannot."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  token = agreed(np.frombuffer(secrets.token_bytes(8), np.uint32)).tobytes().hex()
  probe = os.path.join(folder, f".shared_check_{token}")
  if fileio.is_writer():
    fileio.write_text(probe, token)
  barrier("shared dir: token written")
  try:
    seen = fileio.exists(probe) and fileio.read_text(probe) == token
  except OSError:
    seen = False
  ok = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  barrier("shared dir: token read")
  if fileio.is_writer():
    fileio.path(probe).unlink()
  blind = [i for i, v in enumerate(ok) if not v]
  if blind:
    raise RuntimeError(f"{field} {folder} is not shared between the processes: process(es) {blind} do not see "
                       "the file process 0 wrote there. Every process needs the same workdir on a shared "
                       "filesystem (NFS, a GCS bucket gs://...)")
