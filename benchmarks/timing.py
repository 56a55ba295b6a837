"""The one timing helper of the benchmarks: every timed call goes through `timed`, which also records the
1-minute load average after the call and the cores other processes kept busy during it, so that a timing
taken on a shared CPU says so. Standard library only: the official (torch-only) side imports it too.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable, NamedTuple

OTHER_CPU_LIMIT = 0.25  # cores busy with other processes during a timing, above which it is flagged


def load_average() -> float:
  return os.getloadavg()[0]


def _busy_seconds() -> float:
  """CPU seconds spent by the whole machine (every process, every core) since boot, from /proc/stat."""
  with open("/proc/stat") as f:
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
  """CPU seconds of this process and of the children it has waited for."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class OtherCpu:
  """Measures, over a block, the cores kept busy by *other* processes (machine CPU time minus ours, over
  the wall time). The 1-minute load average counts the benchmark's own threads, so on 2 cores it reads
  about 2 even on an idle machine; this is the number that says whether the timing was shared."""

  def __enter__(self):
    self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())
    return self

  def __exit__(self, *exc):
    wall, busy, own = (b - a for a, b in zip(self.start, (time.perf_counter(), _busy_seconds(), _own_seconds())))
    self.cores = max(0.0, (busy - own) / max(wall, 1e-9))
    return False


class Timed(NamedTuple):
  """One timed call: its result, wall seconds, the load average right after it, other processes' cores."""
  result: Any
  seconds: float
  load: float
  other: float


def timed(fn: Callable[[], Any], sync_fn: Callable[[Any], Any] | None = None) -> Timed:
  """Time one call of `fn`; `sync_fn(result)` waits for its asynchronous work (JAX dispatch, CUDA)."""
  with OtherCpu() as other:
    t0 = time.perf_counter()
    out = fn()
    if sync_fn is not None:
      sync_fn(out)
    seconds = time.perf_counter() - t0
  return Timed(out, seconds, load_average(), other.cores)


@dataclasses.dataclass
class Runs:
  """The timed calls of one side: the first (None when not taken) and the warm ones."""
  first: Timed | None
  warm: list[Timed]

  @property
  def result(self):
    return self.warm[-1].result if self.warm else self.first.result

  @property
  def median(self) -> float:
    return statistics.median(t.seconds for t in self.warm)

  @property
  def best(self) -> float:
    return min(t.seconds for t in self.warm)

  @property
  def all(self) -> list[Timed]:
    return ([self.first] if self.first else []) + self.warm


def interleaved(sides: dict[str, tuple[Callable, Callable | None]], repeats: int) -> dict[str, Runs]:
  """sides: {name: (fn, sync_fn)}. Each side's first call (for ours: tracing and compiling), then `repeats`
  warm calls interleaved (a, b, a, b, ...) so that load from other processes hits both alike."""
  firsts = {name: timed(fn, sync_fn) for name, (fn, sync_fn) in sides.items()}
  warm = {name: [] for name in sides}
  for _ in range(repeats):
    for name, (fn, sync_fn) in sides.items():
      warm[name].append(timed(fn, sync_fn))
  return {name: Runs(firsts[name], warm[name]) for name in sides}


def repeated(fn: Callable, repeats: int, sync_fn: Callable | None = None, setup: Callable | None = None) -> Runs:
  """`repeats` warm calls of one side; with `setup`, each call is `fn(setup())` and setup is not timed
  (a fresh optimizer state, say, so that every call does the same work)."""
  warm = []
  for _ in range(repeats):
    arg = setup() if setup is not None else None
    warm.append(timed(fn if setup is None else lambda: fn(arg), sync_fn))
  return Runs(None, warm)


def load_warning(timings) -> str | None:
  """A warning line when other processes used the CPU during any of these `Timed`s."""
  worst = max(t.other for t in timings)
  if worst > OTHER_CPU_LIMIT:
    return (f"  WARNING: other processes kept {worst:.2f} cores busy during a timing (limit {OTHER_CPU_LIMIT}): "
            f"the CPU was shared, so the ratios above are not valid measurements.")
  return None
