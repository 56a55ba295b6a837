"""Files of a run: one writer per shared file, atomic replacement, any filesystem `etils.epath` knows.

On a pod every process sees the same workdir (a shared disk, or `gs://...` where a GCS filesystem is
installed: epath picks the backend from the path). Two rules keep the processes from racing:
- a shared output (done markers, labels, features, params, exports, reports, evaluation results) is
  written by process 0 only (`is_writer()`); any other process writes only files that are its own
  (`per_process=True`: its PNGs, its `manifest.<process>.jsonl`);
- every write goes to a temporary name unique to the process and the call,
  `<name>.tmp-p<process>-<random hex>`, then replaces the final name in one rename. A reader, or a rerun
  after a kill, sees the old file or the new one, never a torn one; a killed writer leaves only its own
  temporary file (`remove_temp_files`).
"""
from __future__ import annotations

import json
import os
import secrets
from typing import IO, Any, Callable, Union

from etils import epath

TEMP_MARK = ".tmp-p"
Writer = Callable[[IO[bytes]], Any]
Data = Union[bytes, str, Writer]


def process_index() -> int:
  import jax
  return jax.process_index()


def is_writer() -> bool:
  """Process 0 writes the shared outputs of a run."""
  return process_index() == 0


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(p)


def temp_name(name: str) -> str:
  """`<name>.tmp-p<process>-<8 hex>`: no two processes (or two calls) share a temporary file."""
  return f"{name}{TEMP_MARK}{process_index()}-{secrets.token_hex(4)}"


def atomic_write(target: str | os.PathLike, data: Data, *, per_process: bool = False) -> str:
  """Write `data` (bytes, str, or `fn(binary file)`) to a unique temporary file and rename it over `target`.

  Shared files (the default) may only be written by process 0: another process asking is a bug that
  would race with process 0, so it raises. `per_process=True` marks a file only this process writes.
  """
  if not per_process and not is_writer():
    raise RuntimeError(f"{target}: process {process_index()} tried to write a shared file; only process 0 "
                       "writes shared outputs (pass per_process=True for a file that is this process's own)")
  final = epath.Path(target)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / temp_name(final.name)
  try:
    with tmp.open("wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    tmp.replace(final)  # os.replace on a local disk
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return os.fspath(target)


class LineLog:
  """Lines appended to a file that one process owns (a resume log: a manifest, metrics.jsonl).

  On a local or mounted disk each line is appended and flushed as it comes (a kill loses at most the
  line being written). Object stores (gs://) cannot append: there the lines are kept and the whole file
  is replaced (`atomic_write`) at each `flush()`; the caller flushes at the points it resumes from.
  """

  def __init__(self, target: str | os.PathLike, *, per_process: bool = False):
    if not per_process and not is_writer():
      raise RuntimeError(f"{target}: process {process_index()} tried to append to a shared file; only "
                         "process 0 writes shared outputs")
    self.path, self.per_process = os.fspath(target), per_process
    self.remote = "://" in self.path
    if self.remote:
      self._lines = [read_text(self.path)] if exists(self.path) else []
    else:
      makedirs(os.path.dirname(self.path) or ".")
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    if self.remote:
      self._lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()

  def flush(self, durable: bool = False) -> None:
    """Remote: replace the file with every line so far. Local: `durable` also fsyncs (survives a host
    crash, not only a killed process)."""
    if self.remote:
      atomic_write(self.path, "".join(self._lines), per_process=self.per_process)
    elif durable:
      os.fsync(self._file.fileno())

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._file.close()

  def __enter__(self) -> "LineLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_json(target: str | os.PathLike, obj: Any, *, per_process: bool = False, **dump_kw) -> str:
  dump_kw.setdefault("indent", 1)
  return atomic_write(target, json.dumps(obj, **dump_kw), per_process=per_process)


def write_text(target: str | os.PathLike, text: str, *, per_process: bool = False) -> str:
  return atomic_write(target, text, per_process=per_process)


_REQUIRED = object()


def read_json(source: str | os.PathLike, default: Any = _REQUIRED) -> Any:
  """The JSON at `source`; `default` (e.g. None) where the file does not exist, if one is given."""
  if default is not _REQUIRED and not exists(source):
    return default
  return json.loads(epath.Path(source).read_text())


def read_text(source: str | os.PathLike) -> str:
  return epath.Path(source).read_text()


def open_file(source: str | os.PathLike, mode: str = "rb") -> IO:
  """Open a workdir file for reading (local or remote); writes go through `atomic_write` / `LineLog`."""
  return epath.Path(source).open(mode)


def absolute(p: str | os.PathLike) -> str:
  """A local path made absolute (orbax wants that); a URL (gs://...) as it is."""
  p = os.fspath(p)
  return p if "://" in p else os.path.abspath(p)


def exists(p: str | os.PathLike) -> bool:
  return epath.Path(p).exists()


def makedirs(p: str | os.PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def remove(p: str | os.PathLike) -> None:
  """Delete a file or a folder tree, if there."""
  target = epath.Path(p)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()


def remove_temp_files(folder: str | os.PathLike) -> list[str]:
  """Delete the temporary files killed writers left under `folder` (call it from one process while
  no other writes there, e.g. between barriers). Returns what it removed."""
  removed = []
  root = epath.Path(folder)
  if not root.exists():
    return removed
  for folder_path, _, files in root.walk():
    for name in files:
      if TEMP_MARK in name:
        (folder_path / name).unlink()
        removed.append(os.fspath(folder_path / name))
  return removed
