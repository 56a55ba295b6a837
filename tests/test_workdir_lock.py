"""One run per workdir (issue 19, case 1).

Before: two `launch/pipeline.py` runs started 0.5 s apart on one workdir both wrote into it; one died in
orbax, the other exited 0 with 24 of 32 synthetic images in the manifest, and a rerun skipped every stage.
Now process 0 holds `<workdir>/run.lock` for the whole run and a second run refuses at once, naming it."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from synood_jax.pipeline import lock
from synood_jax.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_holder_refused_with_the_holders_name(tmp_path):
  root = str(tmp_path)
  with lock.hold(root, command="first run"):
    with pytest.raises(lock.WorkdirBusy) as e:
      with lock.hold(root, command="second run"):
        pass
    msg = str(e.value)
    assert msg.startswith(f"{root} is in use by another run: pid {os.getpid()} on host ")
    assert "command: first run" in msg and "use another --workdir" in msg
    assert json.load(open(Workdir(root).lock))["command"] == "first run"
  with lock.hold(root, command="third run"):  # released: free again
    pass
  assert "released" in json.load(open(Workdir(root).lock))


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
  root = str(tmp_path)
  dead = {"host": "h", "pid": _dead_pid(), "started": "2026-01-01T00:00:00", "command": "killed run"}
  with open(Workdir(root).lock, "w") as f:  # written, never released: its process was killed
    json.dump(dead, f)
  with caplog.at_level(logging.WARNING), lock.hold(root):
    pass
  assert any("the previous run (pid %d on host h, started 2026-01-01T00:00:00, command: killed run) ended "
             "without releasing it (killed?); taking it over" % dead["pid"] in r.getMessage()
             for r in caplog.records)


def test_lock_still_held_for_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  """A descriptor inherited by a leftover child keeps the flock after its run died: the record's pid is
  dead on this host, so the lock file is replaced."""
  import fcntl
  import socket
  root = str(tmp_path)
  path = Workdir(root).lock
  fd = os.open(path, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(fd, json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "command": "gone"}).encode())
  try:
    with caplog.at_level(logging.WARNING), lock.hold(root, command="new run"):
      assert json.load(open(path))["command"] == "new run"
    assert any("is no longer running but the lock is still held" in r.getMessage() for r in caplog.records)
  finally:
    os.close(fd)


def test_lease_on_an_object_store(tmp_path, caplog):
  """gs:// cannot be flock'ed: a lease with a heartbeat (forced here on a local folder)."""
  root = str(tmp_path)
  kw = dict(lease=True, heartbeat_secs=0.1, lease_secs=1.0, settle_secs=0.05)
  with lock.hold(root, command="first", **kw):
    beat = json.load(open(Workdir(root).lease))["heartbeat"]
    with pytest.raises(lock.WorkdirBusy, match="is in use by another run: pid .* command: first"):
      with lock.hold(root, command="second", **kw):
        pass
    time.sleep(0.35)
    assert json.load(open(Workdir(root).lease))["heartbeat"] > beat  # renewed while held
  assert "released" in json.load(open(Workdir(root).lease))
  stale = {"host": "h", "pid": 1, "command": "crashed", "token": "x", "heartbeat": time.time() - 5}
  with open(Workdir(root).lease, "w") as f:
    json.dump(stale, f)
  with caplog.at_level(logging.WARNING), lock.hold(root, command="third", **kw):
    assert json.load(open(Workdir(root).lease))["command"] == "third"
  assert any("last renewed it" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)


# A real run whose first stage waits for a file: `runner.run` with the stage functions replaced.
HOLDER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from configs import demo
    import dataclasses
    from synood_jax.pipeline import runner, stages
    W = {workdir!r}
    def wait(ctx):
      open(os.path.join(W, "first_started"), "w").close()
      while not os.path.exists(os.path.join(W, "first_may_finish")):
        time.sleep(0.05)
      return {{}}
    for name in stages.STAGES:
      stages.BY_NAME[name] = dataclasses.replace(stages.BY_NAME[name], run=wait if name == "models" else lambda ctx: {{}})
    runner.run(demo.get_config(), W)
""")


def _wait_for(path, proc, seconds=120):
  deadline = time.time() + seconds
  while not os.path.exists(path):
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_two_real_runs_on_one_workdir(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, workdir=workdir)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  second_cmd = ["timeout", "120", sys.executable, os.path.join(ROOT, "launch", "pipeline.py"),
                f"--config={ROOT}/configs/demo.py", f"--workdir={workdir}", "--stages=report"]
  try:
    _wait_for(os.path.join(workdir, "first_started"), first)
    second = subprocess.run(second_cmd, env=env, capture_output=True, text=True)
    assert second.returncode not in (0, 124), second.stderr[-3000:]
    assert f"{workdir} is in use by another run: pid {first.pid} on host" in second.stderr, second.stderr[-3000:]
    assert first.poll() is None  # the first run is untouched ...
    open(os.path.join(workdir, "first_may_finish"), "w").close()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]  # ... and finishes every stage
    assert os.path.exists(Workdir(workdir).done("report"))

    # A run killed while it holds the workdir: the next one takes the lock over, with a warning.
    os.remove(os.path.join(workdir, "first_started"))
    os.remove(os.path.join(workdir, "first_may_finish"))
    for name in os.listdir(os.path.join(workdir, "done")):
      os.remove(os.path.join(workdir, "done", name))
    killed = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, workdir=workdir)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(os.path.join(workdir, "first_started"), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    third = subprocess.run(second_cmd, env=env, capture_output=True, text=True)
    assert f"the previous run (pid {killed.pid} on host" in third.stderr, third.stderr[-3000:]
    assert "ended without releasing it (killed?); taking it over" in third.stderr
    # past the lock, the plan runs: the report alone needs stages this workdir does not have
    assert "stage report needs stage(s)" in third.stderr
  finally:
    if first.poll() is None:
      first.kill()
