"""One run at a time per workdir: process 0 holds the workdir's lock for the whole run.

Two runs on one workdir interleave their writes (two synthesis loops appending to one manifest, two
orbax managers committing one checkpoint) and can both exit 0 with mixed results, so a second run must
refuse before it writes anything.

- Local or mounted disk: `fcntl.flock` on `<workdir>/run.lock`, exclusive and non-blocking. The file
  records the holder (host, pid, start time, command) so that the refusal can name it. The kernel drops
  the lock when its process dies, however it dies; a record without `released` then tells the next run
  that the last one was killed, which it says in a warning. If the lock is still held but its recorded
  process is gone on this same host (a child that inherited the descriptor, a lock an NFS server kept),
  the lock file is replaced and taken over, with a warning naming the dead holder.
- Object store (gs://...), where files cannot be locked: a lease, `<workdir>/run.lease`, rewritten by a
  heartbeat thread every `heartbeat_secs`. A run refuses while the lease's heartbeat is younger than
  `lease_secs`; an older one is taken over with a warning. Object stores have no create-if-absent here,
  so the lease is claimed by writing it, waiting `settle_secs` and reading it back: of two runs that
  start together the last writer keeps it and the other refuses. That is a best effort, not a proof
  (it assumes each write is visible to the other run within `settle_secs`), and it is documented as such.

Only process 0 of a multi-host job takes it (`runner.run`); the others learn the outcome from it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
import threading
import time

from absl import logging

from synood_jax import fileio
from synood_jax.pipeline.workdir import Workdir

class WorkdirBusy(RuntimeError):
  """Another run holds the workdir; the message names it."""


def holder_record(command: str | None = None) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": command if command is not None else " ".join([sys.executable] + sys.argv)}


def describe(record: dict | None) -> str:
  if not record:
    return "an unknown run (its lock file names no holder)"
  return (f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}, "
          f"command: {record.get('command')}")


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # someone else's live process (or an unreadable pid: assume alive, refuse)
  return True


def _busy(root: str, record: dict | None) -> WorkdirBusy:
  return WorkdirBusy(f"{root} is in use by another run: {describe(record)}. Two runs on one workdir mix "
                     "their outputs; wait for that run to end (or stop it), or use another --workdir.")


def _read_record_fd(fd: int) -> dict | None:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 1 << 16).decode("utf-8") or "null")
  except (OSError, ValueError):
    return None


def _write_record_fd(fd: int, record: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(record, sort_keys=True).encode("utf-8"))
  os.fsync(fd)


@contextlib.contextmanager
def _flock(root: str, record: dict):
  import fcntl
  path = Workdir(root).lock
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (PEP 446)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      held, inode = _read_record_fd(fd), os.fstat(fd).st_ino
      os.close(fd)
      if held and held.get("host") == record["host"] and not _alive(held.get("pid")):
        logging.warning("workdir lock %s: its holder (%s) is no longer running but the lock is still held "
                        "(an inherited descriptor?); taking it over", path, describe(held))
        with contextlib.suppress(FileNotFoundError):
          if os.stat(path).st_ino == inode:  # not a file another run just made by taking it over too
            os.unlink(path)  # a new file, a new lock: whoever holds the old one holds nothing now
        continue
      raise _busy(root, held) from None
    # The file may have been replaced between open and flock (a takeover): lock the current one.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  previous = _read_record_fd(fd)
  if previous and "released" not in previous:
    logging.warning("workdir lock %s: the previous run (%s) ended without releasing it (killed?); taking "
                    "it over. Its finished stages are kept; a stage it left half done resumes or restarts.",
                    path, describe(previous))
  _write_record_fd(fd, record)
  try:
    yield path
  finally:
    _write_record_fd(fd, {**record, "released": time.time()})
    os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def _lease(root: str, record: dict, heartbeat_secs: float, lease_secs: float, settle_secs: float):
  path = Workdir(root).lease

  def read():
    try:
      return fileio.read_json(path) if fileio.exists(path) else None
    except (OSError, ValueError):
      return None

  held = read()
  if held and "released" not in held:
    age = time.time() - float(held.get("heartbeat", 0))
    if age < lease_secs:
      raise _busy(root, held)
    logging.warning("workdir lease %s: its holder (%s) last renewed it %.0f s ago (lease %.0f s); taking it "
                    "over", path, describe(held), age, lease_secs)
  token = secrets.token_hex(8)
  mine = {**record, "token": token, "heartbeat": time.time(), "lease_secs": lease_secs}
  fileio.write_json(path, mine)
  time.sleep(settle_secs)
  now = read()
  if not now or now.get("token") != token:
    raise _busy(root, now)
  stop = threading.Event()

  def beat():
    while not stop.wait(heartbeat_secs):
      current = read()
      if not current or current.get("token") != token:
        logging.error("workdir lease %s was taken by %s while this run held it", path, describe(current))
        return
      fileio.write_json(path, {**mine, "heartbeat": time.time()})

  thread = threading.Thread(target=beat, daemon=True, name="synood-workdir-lease")
  thread.start()
  try:
    yield path
  finally:
    stop.set()
    thread.join()
    current = read()
    if current and current.get("token") == token:
      fileio.write_json(path, {**mine, "released": time.time()})


@contextlib.contextmanager
def hold(root: str, command: str | None = None, *, lease: bool | None = None, heartbeat_secs: float = 30.0,
         lease_secs: float = 120.0, settle_secs: float = 2.0):
  """Hold `root` for this run (a lock on a disk; a lease on an object store, or with `lease=True`);
  raises WorkdirBusy naming the holder when another run has it."""
  fileio.makedirs(root)
  record = holder_record(command)
  use_lease = "://" in root if lease is None else lease
  cm = (_lease(root, record, heartbeat_secs, lease_secs, settle_secs) if use_lease else _flock(root, record))
  with cm as path:
    logging.info("workdir %s: held by this run (pid %d, %s)", root, record["pid"], path)
    yield path


@contextlib.contextmanager
def hold_for_job(root: str):
  """`hold` on process 0 only; every process of the job raises the same WorkdirBusy when it failed."""
  from synood_jax import runtime
  with contextlib.ExitStack() as stack:
    error = ""
    if fileio.is_writer():
      try:
        stack.enter_context(hold(root))
      except WorkdirBusy as e:
        error = str(e)
    error = runtime.gather_json(error)[0]
    if error:
      raise WorkdirBusy(error)
    yield
