"""A tiny progress reporter for long jobs: done/total, items/s and ETA, logged through absl.

    progress = Progress(total=steps, initial=start_step, name="stage2", every_secs=30)
    compile_first_step()
    progress.restart()         # the rate and ETA exclude the compile
    for step in range(start_step, steps):
      ...
      progress.update()        # logs at most every `every_secs` (and always on the last item)

The rate counts only the items done by this process (a resumed job does not claim the items its
predecessor did), so the ETA is honest after a restart. `clock` is injectable for tests.
"""
from __future__ import annotations

import time
from typing import Callable

from absl import logging


def format_seconds(seconds: float) -> str:
  """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'; inf/nan -> '?'."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


class Progress:
  """Counts items towards `total`; logs `name: done/total (pct) rate unit/s, ETA ...`."""

  def __init__(self, total: int, *, initial: int = 0, name: str = "progress", unit: str = "it",
               every_secs: float = 30.0, log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic):
    if total < 0 or initial < 0 or initial > total:
      raise ValueError(f"Progress({name!r}): need 0 <= initial ({initial}) <= total ({total})")
    self.total = int(total)
    self.done = int(initial)
    self.name = name
    self.unit = unit
    self.every_secs = float(every_secs)
    self._log = log if log is not None else (lambda msg: logging.info("%s", msg))
    self._clock = clock
    self._initial = self.done
    self._start = clock()
    self._last_log = self._start
    self.last_message = ""

  def restart(self, done: int = 0) -> None:
    """Counts rate and ETA from now, e.g. after a compile: the items done so far, plus `done` more
    (say the batch that compiled), are not part of the pace."""
    self.done += int(done)
    self._initial = self.done
    self._start = self._last_log = self._clock()

  @property
  def rate(self) -> float:
    """Items per second done by this process since it started (0 before any time passes)."""
    elapsed = self._clock() - self._start
    return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

  @property
  def eta_seconds(self) -> float:
    rate = self.rate
    remaining = self.total - self.done
    if remaining <= 0:
      return 0.0
    return remaining / rate if rate > 0 else float("inf")

  def message(self, extra: str = "") -> str:
    pct = 100.0 * self.done / self.total if self.total else 100.0
    msg = (f"{self.name}: {self.done}/{self.total} ({pct:.1f}%) {self.rate:.2f} {self.unit}/s, "
           f"ETA {format_seconds(self.eta_seconds)}, elapsed {format_seconds(self._clock() - self._start)}")
    return f"{msg}; {extra}" if extra else msg

  def update(self, n: int = 1, extra: str = "") -> bool:
    """Adds `n` items; logs when `every_secs` passed since the last log or the job is done.

    Returns whether it logged. `extra` (e.g. 'loss 0.53') is appended to the logged line.
    """
    self.done += int(n)
    now = self._clock()
    if now - self._last_log >= self.every_secs or self.done >= self.total:
      self._last_log = now
      self.last_message = self.message(extra)
      self._log(self.last_message)
      return True
    return False
