"""Process setup shared by the launchers: compile cache, multi-host init, timing of compiles."""
from __future__ import annotations

import contextlib
import logging as py_logging
import os
import time

import jax
from absl import logging


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
  """Persistent compilation cache on by default (a config field), multi-host when asked, libraries'
  INFO logs off (--verbosity=1 shows them)."""
  quiet_library_logs()
  cache = config.get("compile_cache_dir", os.path.expanduser("~/.cache/synood_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if config.get("multi_host", False) and jax.process_count() == 1:
    jax.distributed.initialize()
  logging.info("JAX %s: %d process(es), %d device(s) (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)


@contextlib.contextmanager
def timed(what: str):
  """Log how long a block took (used to keep compile time apart from run time)."""
  start = time.perf_counter()
  yield
  logging.info("%s took %.2f s", what, time.perf_counter() - start)


def compile_ahead(jitted, *args, what: str = "compile", **kwargs):
  """Lower and compile a jitted function for these arguments, logging compile time on its own."""
  with timed(what):
    return jitted.lower(*args, **kwargs).compile()
