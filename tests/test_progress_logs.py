"""Progress a person can read (issue 11, item 9): the ETA starts after the compile, long encodes report
items/s, and libraries' INFO lines (orbax: about 750 of 825 lines of a demo run) are off by default."""
import logging
import os
import types

import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from synood_jax import runtime
from synood_jax.models import zero_shot
from synood_jax.progress import Progress


def test_eta_starts_after_the_compile():
  """Before: 'ETA 54m' for a job that ended 3.5 minutes later (the first batch carried the compile)."""
  now, logged = [0.0], []
  clock = lambda: now[0]
  before = Progress(32, name="synthesis", unit="img", every_secs=1, log=logged.append, clock=clock)
  after = Progress(32, name="synthesis", unit="img", every_secs=1, log=logged.append, clock=clock)
  now[0] = 200.0                    # compile: 200 s
  after.restart()
  now[0] = 210.0                    # first batch of 8: 10 s
  before.update(8)
  after.update(8)
  assert before.eta_seconds == 24 * 210 / 8      # 630 s: the compile counted as work
  assert after.eta_seconds == 24 * 10 / 8        # 30 s: the pace of the run
  assert logged[-1] == "synthesis: 8/32 (25.0%) 0.80 img/s, ETA 30s, elapsed 10s"
  # restart(done=n): a batch that compiled counts as done but not as pace
  p = Progress(30, name="enc", every_secs=100, log=logged.append, clock=clock)
  now[0] = 300.0
  p.restart(done=10)
  now[0] = 302.0
  p.update(10)
  assert p.done == 20 and p.rate == 5.0 and p.eta_seconds == 2.0


def test_batched_encoding_reports_progress(caplog):
  x = np.arange(30, dtype=np.float32).reshape(30, 1)
  with caplog.at_level(logging.INFO):
    bundle = types.SimpleNamespace(module=None)  # the stand-in encoder below needs no model
    out = zero_shot._batched(lambda m, p, v: v * 2, bundle, {}, x, 8, None, name="text encoder: 30 prompts")
  np.testing.assert_array_equal(out, x * 2)
  lines = [r.getMessage() for r in caplog.records if "text encoder" in r.getMessage()]
  assert lines and lines[-1].startswith("text encoder: 30 prompts: 30/30 (100.0%)") and "items/s" in lines[-1]


def _record(pathname, level):
  return logging.LogRecord("absl", level, pathname, 1, "msg", None, None)


def test_library_info_lines_are_off_by_default():
  f = runtime._OwnInfoOnly()
  orbax_file = os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py")
  ours = os.path.join(runtime._REPO, "synood_jax", "pipeline", "stages.py")
  assert not f.filter(_record(orbax_file, logging.INFO))
  assert f.filter(_record(orbax_file, logging.WARNING))
  assert f.filter(_record(ours, logging.INFO))
  handler = absl_logging.get_absl_handler()
  old = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(absl_logging.INFO)          # the default: libraries quiet
    runtime.quiet_library_logs()
    runtime.quiet_library_logs()                           # idempotent
    assert sum(isinstance(x, runtime._OwnInfoOnly) for x in handler.filters) == 1
  finally:
    for x in [x for x in handler.filters if isinstance(x, runtime._OwnInfoOnly)]:
      handler.removeFilter(x)
    absl_logging.set_verbosity(old)
  absl_logging.set_verbosity(absl_logging.DEBUG)           # --verbosity=1: everything
  try:
    runtime.quiet_library_logs()
    assert not any(isinstance(x, runtime._OwnInfoOnly) for x in handler.filters)
  finally:
    absl_logging.set_verbosity(old)
