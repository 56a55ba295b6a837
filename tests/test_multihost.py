"""Several JAX processes on 127.0.0.1 (CPU, gloo) against one process with the same global mesh.

Every run here is a real job: `launch/*.py` subprocesses (the README's pod launch), a coordinator on a
free loopback port, `timeout` around each process. On a config smaller than the demo:
- the whole pipeline on 2 processes x 1 device equals 1 process x 2 devices file for file, bit for bit
  (PNGs, manifests, labels, features, params, exports, evaluation scores and caches, done markers);
  an audit hook (sys.addaudithook, in a sitecustomize) logs every file each process opened for writing
  or renamed into place: each shared file has exactly one writer, temporary names are per process;
- a synthesis killed with SIGKILL on 2 processes and resumed on 3 (auto-detected as a Slurm job; an
  uneven split, with a process left idle in the last batch) ends with the reference's exact outputs;
- feature extraction for evaluation: each process opens only its own slice of the images, corrupt
  ones included, and the gathered features equal one process's;
- bad cluster descriptions end with one error naming the config field, within the timeout.
Equality is bit for bit because every device gets the same rows in both runs (per-device batch 1 in
synthesis; the same global mesh of 2 devices elsewhere).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds, around every process: a hang fails the test, not the CI job
# The demo, smaller: 4 classes x 2 sources, 2 held-out images per class, 5 sampler steps, K=2,
# 2 epochs of each fine-tuning stage.
TINY = ["--config=configs/demo.py", "--config.data.generate.train_per_class=3",
        "--config.data.generate.val_per_class=2", "--config.sources.per_class=2", "--config.synthesis.steps=5",
        "--config.synthesis.iterations=2", "--config.synthesis.batch_size=2", "--config.stage2.epochs=2",
        "--config.stage3.epochs=2", "--config.stage2.batch_size=4", "--config.stage3.batch_size=4",
        "--config.stage2.checkpoint_every=2", "--config.stage3.checkpoint_every=2",
        "--config.eval.batch_size=4", "--config.eval.groups=2"]

# Installed with PYTHONPATH in the audited processes: logs (event, path) of every file under
# $SYNOOD_AUDIT_ROOT this process opens for writing or renames into place, or opens to read an image.
SITECUSTOMIZE = r'''
import os, sys, threading
_out, _root = os.environ.get("SYNOOD_AUDIT_FILE"), os.environ.get("SYNOOD_AUDIT_ROOT")
if _out and _root:
  _lock, _local, _log = threading.Lock(), threading.local(), []  # the image loader opens from threads
  _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
  def _hook(event, args):
    if event not in ("open", "os.rename") or getattr(_local, "busy", False):
      return
    if event == "open":
      path, mode, flags = args
      if isinstance(mode, str):
        kind = "write" if any(c in mode for c in "wax+") else "read"
      else:
        kind = "write" if (flags or 0) & _WRITE else "read"
    else:
      path, kind = args[1], "rename"
    if not isinstance(path, str) or not os.path.abspath(path).startswith(_root):
      return
    if kind == "read" and not path.lower().endswith((".png", ".jpeg", ".jpg")):
      return
    _local.busy = True  # opening the log itself must not recurse
    try:
      with _lock:
        if not _log:
          _log.append(open(_out, "a", buffering=1))
        _log[0].write(f"{kind}\t{os.path.abspath(path)}\n")
    finally:
      _local.busy = False
  sys.addaudithook(_hook)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_JOBS: list = []


class Job:
  """N processes of one launcher command on 127.0.0.1; each one's output in its own log file.

  cluster: 'explicit' (the config's distributed fields; the default for N > 1), 'slurm' (auto-detected
  from a Slurm-shaped environment) or 'none'. `argv_of(i)` / `distributed_of(i)` vary a process's
  arguments / fields (bad-input tests)."""

  def __init__(self, tmp, name: str, argv: list[str], nproc: int, *, devices: int = 1, cluster: str = "",
               audit_root: str = "", argv_of=None, distributed_of=None, timeout: int = TIMEOUT):
    self.port, self.nproc, self.logs, self.audits, self.procs = _free_port(), nproc, [], [], []
    cluster = cluster or ("explicit" if nproc > 1 else "none")
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for i in range(nproc):
      env = dict(os.environ, PYTHONPATH=f"{site}:{ROOT}", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                 JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{self.port}")
      args = list(argv_of(i) if argv_of else argv)
      args.append(f"--config.compile_cache_dir={os.environ['SYNOOD_COMPILE_CACHE']}")
      if cluster == "explicit":  # a hand-made cluster: the config names it
        d = dict(coordinator_address=f"127.0.0.1:{self.port}", num_processes=nproc, process_id=i,
                 initialization_timeout=120)
        d.update(distributed_of(i) if distributed_of else {})
        args += ["--config.multi_host=True"] + [f"--config.distributed.{k}={v}" for k, v in d.items()]
      elif cluster == "slurm":  # auto-detected: a Slurm-shaped environment on one machine
        env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(nproc),
                   SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{self.port}")
        args += ["--config.multi_host=True"]
      if audit_root:
        self.audits.append(str(tmp / f"{name}.audit.{i}"))
        env.update(SYNOOD_AUDIT_FILE=self.audits[-1], SYNOOD_AUDIT_ROOT=audit_root)
      self.logs.append(str(tmp / f"{name}.{i}.log"))
      with open(self.logs[-1], "w") as log:  # `timeout` leads its own process group: killpg ends both
        self.procs.append(subprocess.Popen(["timeout", "-k", "10", str(timeout), sys.executable, *args],
                                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    _JOBS.append(self)

  def wait(self) -> list[int]:
    return [p.wait() for p in self.procs]

  def kill(self) -> None:
    """SIGKILL every process of the job (what a preempted or killed job looks like)."""
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    self.wait()

  def output(self, i: int) -> str:
    return open(self.logs[i]).read()

  def check(self) -> None:
    codes = self.wait()
    if any(codes):
      tails = "\n".join(f"--- process {i} (exit {c}):\n{self.output(i)[-3000:]}" for i, c in enumerate(codes))
      raise AssertionError(f"a process failed:\n{tails}")


@pytest.fixture(autouse=True)
def _no_stray_processes():
  yield
  while _JOBS:
    _JOBS.pop().kill()


def _pipeline(tmp, name, workdir, nproc, *, devices=1, extra=(), **kw) -> Job:
  return Job(tmp, name, ["launch/pipeline.py", f"--workdir={workdir}", *TINY, *extra], nproc, devices=devices, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The whole pipeline on 1 process x 2 devices."""
  tmp = tmp_path_factory.mktemp("reference")
  workdir = str(tmp / "work")
  start = time.perf_counter()
  _pipeline(tmp, "ref", workdir, 1, devices=2).check()
  print(f"reference (1 process x 2 devices): {time.perf_counter() - start:.0f} s")
  return workdir


# ---------------------------------------------------------------------------------------------
# Comparing two workdirs.

def _files(root: str) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(root):
    for f in files:
      path = os.path.join(folder, f)
      rel = os.path.relpath(path, root)
      if "/checkpoints/" in f"/{rel}":  # orbax's own layout (timestamps); the params they end in are compared
        continue
      if rel == "run.lock":  # who held the workdir (host, pid, start time): one run's own record
        continue
      if rel.startswith(os.path.join("eval", "cache")):  # the key hashes the model folder path: by set name
        rel = os.path.join("eval", "cache", f.rsplit("-", 1)[0] + ".npz")
      out[rel] = path
  return out


def _normalised(x, root: str):
  """JSON with the workdir path replaced, and the run times and the launch (config.json's cluster
  fields) dropped."""
  if isinstance(x, dict):
    return {k: _normalised(v, root) for k, v in x.items() if k not in ("seconds", "multi_host", "distributed")}
  if isinstance(x, list):
    return [_normalised(v, root) for v in x]
  if isinstance(x, str):
    x = x.replace(root, "<workdir>")
    return x.rsplit("-", 1)[0] if "/eval/cache/" in x else x
  return x


def _difference(a: str, b: str, root_a: str, root_b: str) -> str | None:
  if a.endswith((".npz", ".npy")):
    za, zb = np.load(a), np.load(b)
    za, zb = (dict(z) if a.endswith(".npz") else {"": z} for z in (za, zb))
    if za.keys() != zb.keys():
      return f"keys {sorted(za)} vs {sorted(zb)}"
    bad = [k for k in za if not np.array_equal(
        *(np.char.replace(z[k], r, "<workdir>") if z[k].dtype.kind == "U" else z[k]
          for z, r in ((za, root_a), (zb, root_b))))]
    return f"arrays {bad}" if bad else None
  if a.endswith(".json"):
    ja, jb = (_normalised(json.load(open(p)), r) for p, r in ((a, root_a), (b, root_b)))
    return None if ja == jb else "json"
  if a.endswith((".jsonl", ".md", ".txt")):
    return None if open(a).read().replace(root_a, "<workdir>") == open(b).read().replace(root_b, "<workdir>") else "text"
  return None if open(a, "rb").read() == open(b, "rb").read() else "bytes"


def assert_same_outputs(ours: str, ref: str, under: str = "") -> int:
  fa, fb = _files(os.path.join(ours, under)), _files(os.path.join(ref, under))
  assert sorted(fa) == sorted(fb), f"files differ: only ours {sorted(set(fa) - set(fb))}, only ref {sorted(set(fb) - set(fa))}"
  diff = {p: d for p in fa if (d := _difference(fa[p], fb[p], ours, ref))}
  assert not diff, f"{len(diff)} of {len(fa)} files differ: {diff}"
  return len(fa)


def _audit(job: Job) -> dict[str, set[int]]:
  """path -> the processes that wrote it (opened for writing, or renamed a file onto it)."""
  writers: dict[str, set[int]] = {}
  for i, path in enumerate(job.audits):
    for line in open(path) if os.path.exists(path) else []:
      kind, p = line.rstrip("\n").split("\t")
      if kind != "read":
        writers.setdefault(p, set()).add(i)
  return writers


# ---------------------------------------------------------------------------------------------
# Tests.

def test_pipeline_on_two_processes_equals_one(reference, tmp_path):
  """The README's pod launch (explicit cluster fields), 2 processes x 1 device, the whole pipeline."""
  workdir = str(tmp_path / "work")
  start = time.perf_counter()
  job = _pipeline(tmp_path, "mh", workdir, 2, audit_root=workdir)
  job.check()
  print(f"2 processes x 1 device: {time.perf_counter() - start:.0f} s")
  n = assert_same_outputs(workdir, reference)
  print(f"{n} files equal bit for bit to the 1-process x 2-device run")
  # Counts come from the merged results: 8 images, not one process's 4.
  info = json.load(open(os.path.join(workdir, "done", "synthesis.json")))
  assert info["images"] == 8 and sum(info["status"].values()) == 8 and info["heldout"]["images"] == 8
  # The logs say who is who and that the cluster formed.
  for i in range(2):
    assert f"process {i} of 2 joined" in job.output(i), job.output(i)[-2000:]
  # Each file has exactly one writer; process 1 wrote only its own files (PNGs, its manifest), and
  # every temporary file name carries its writer's process id.
  writers = _audit(job)
  shared = {p: w for p, w in writers.items() if len(w) > 1}
  assert not shared, f"written by several processes: {sorted(shared)[:10]}"
  for p, w in writers.items():
    (i,) = w
    if ".tmp-p" in p:
      assert f".tmp-p{i}-" in p, p
  by_one = sorted(os.path.relpath(p, workdir) for p, w in writers.items() if w == {1} and ".tmp-p" not in p)
  own = (".png", "manifest.1.jsonl", "array_metadatas/process_1")  # its images, its manifest, orbax's own
  assert by_one and all(p.endswith(own) for p in by_one), by_one
  assert not os.path.exists(os.path.join(workdir, "synthesis", "manifest.1.jsonl"))  # merged, then removed
  print(f"{len(writers)} files written, each by one process; process 1's own: {len(by_one)}")


def test_synthesis_killed_on_two_processes_resumes_on_three(reference, tmp_path):
  """SIGKILL a 2-process synthesis midway; rerun on 3 processes (Slurm-detected; 8 sources split
  3/3/2, an idle process in the last batch): the outputs are the uninterrupted run's, exactly."""
  workdir = str(tmp_path / "work")
  argv = ["launch/synthesize.py", f"--workdir={workdir}", *TINY]
  job = Job(tmp_path, "killed", argv, 2)
  parts = [os.path.join(workdir, "synthesis", f"manifest.{i}.jsonl") for i in range(2)]
  deadline = time.time() + TIMEOUT
  lines = 0
  while time.time() < deadline and all(p.poll() is None for p in job.procs):
    lines = sum(sum(1 for _ in open(p)) for p in parts if os.path.exists(p))
    if lines >= 2:
      break
    time.sleep(0.05)
  assert all(p.poll() is None for p in job.procs), "the synthesis ended before it could be killed"
  job.kill()
  print(f"killed after {lines} of 8 images")
  assert 2 <= lines < 8
  resumed = Job(tmp_path, "resumed", argv + ["--config.synthesis.batch_size=3"], 3, cluster="slurm")
  resumed.check()
  assert "synthesis: 8 sources" in resumed.output(0)
  for under in ("synthesis", "synthesis_heldout"):
    n = assert_same_outputs(workdir, reference, under)
    print(f"{under}: {n} files equal to the uninterrupted run")
  leftovers = [f for _, _, fs in os.walk(workdir) for f in fs
               if ".tmp-p" in f or (f.startswith("manifest.") and f != "manifest.jsonl")]
  assert not leftovers, leftovers
  assert json.load(open(os.path.join(workdir, "done", "synthesis.json")))["images"] == 8


def test_evaluation_features_each_process_reads_its_slice(reference, tmp_path):
  """11 images (3 corrupt, 2 of them forming process 1's whole share of a batch), global batches of 4:
  each process opens only its rows, and the gathered features, indices and failures equal one
  process's with the same 2-device mesh."""
  import shutil
  images = tmp_path / "images"
  images.mkdir()
  val = os.path.join(reference, "data", "val")
  good = sorted(os.path.join(d, f) for d, _, fs in os.walk(val) for f in fs)[:8]
  for k, src in enumerate(good[:8]):  # records 0..10 in name order; 3, 6, 7 are corrupt
    shutil.copyfile(src, images / f"{k + (k >= 3) + 2 * (k >= 5):02d}.jpg")
  for k in (3, 6, 7):
    (images / f"{k:02d}.jpg").write_bytes(b"not a jpeg")
  script = tmp_path / "encode.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      from absl import app, flags
      from ml_collections import config_flags
      from synood_jax import parallel, runtime
      _C = config_flags.DEFINE_config_file("config", "{ROOT}/configs/demo.py", "")
      _OUT = flags.DEFINE_string("out", None, "")

      def main(_):
        runtime.setup(_C.value)
        with runtime.fail_fast():
          from synood_jax.data import datasets as data
          from synood_jax.models import clip
          from synood_jax.ood import features
          bundle = clip.from_pretrained("{reference}/models/clip")
          mesh = parallel.make_mesh()
          ds = data.image_folder("{images}", "set", flat=True)
          preprocess = features.make_preprocess(bundle.folder, bundle.config.vision.image_size)[0]
          features.extract_features(bundle, parallel.shard_params(bundle.params, mesh), ds, preprocess,
                                      batch_size=4, mesh=mesh, cache_path=_OUT.value, num_threads=2)
      app.run(main)
  """))
  one = Job(tmp_path, "enc1", [str(script), f"--out={tmp_path / 'one.npz'}"], 1, devices=2)
  two = Job(tmp_path, "enc2", [str(script), f"--out={tmp_path / 'two.npz'}"], 2, audit_root=str(images))
  one.check()
  two.check()
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  for k in ("features", "labels", "indices", "failures"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(a["indices"], [0, 1, 2, 4, 5, 8, 9, 10])
  assert [os.path.basename(f["path"]) for f in json.loads(str(a["failures"]))] == ["03.jpg", "06.jpg", "07.jpg"]
  opened = [sorted(os.path.basename(line.split("\t")[1].strip()) for line in open(p) if line.startswith("read"))
            for p in two.audits]
  # Global batch k = records 4k..4k+3: process 0 reads rows 0-1, process 1 rows 2-3.
  assert opened[0] == ["00.jpg", "01.jpg", "04.jpg", "05.jpg", "08.jpg", "09.jpg"], opened[0]
  assert opened[1] == ["02.jpg", "03.jpg", "06.jpg", "07.jpg", "10.jpg"], opened[1]


def test_bad_cluster_descriptions_name_the_field(tmp_path):
  """Each ends within its timeout with one error naming the field (all launched at once)."""
  def job(name, nproc, **kw):
    argv = ["launch/pipeline.py", *TINY, f"--workdir={tmp_path / name}"]
    return Job(tmp_path, name, argv, nproc, cluster="explicit", timeout=180, **kw)
  jobs = {
      # process_id outside [0, num_processes): refused before connecting
      "range": job("range", 1, distributed_of=lambda i: dict(process_id=2, num_processes=2)),
      # nobody listens at the coordinator (process 1 alone)
      "unreachable": job("unreachable", 1, distributed_of=lambda i: dict(
          process_id=1, num_processes=2, initialization_timeout=4)),
      # 3 processes announced, 2 started: the cluster never forms
      "missing": job("missing", 2, distributed_of=lambda i: dict(num_processes=3, initialization_timeout=8)),
      # the processes disagree on the count
      "disagree": job("disagree", 2, distributed_of=lambda i: dict(num_processes=2 + i)),
      # each process has its own, unshared, workdir
      "unshared": job("unshared", 2, argv_of=lambda i: ["launch/pipeline.py", *TINY,
                                                         f"--workdir={tmp_path / f'unshared{i}'}"]),
  }
  start = time.perf_counter()
  codes = {name: j.wait() for name, j in jobs.items()}
  elapsed = time.perf_counter() - start
  out = {name: "\n".join(j.output(i) for i in range(j.nproc)) for name, j in jobs.items()}
  assert all(c not in (0, 124, 137) for cs in codes.values() for c in cs), codes  # 124/137: `timeout` fired
  assert "config.distributed.process_id=2: must be in [0, num_processes=2)" in out["range"]
  assert "config.distributed.coordinator_address='127.0.0.1:" in out["unreachable"]
  assert "nothing accepted a connection within 4 s" in out["unreachable"]
  assert out["missing"].count("the cluster did not form within 8 s") == 2, out["missing"][-3000:]
  assert "config.distributed.num_processes" in out["missing"]
  assert out["disagree"].count("config.distributed does not match the cluster of 2 processes: "
                               "process 1 has num_processes=3") == 2, out["disagree"][-3000:]
  assert out["unshared"].count("is not shared between the processes: process(es) [1]") == 2
  assert "--workdir" in out["unshared"]
  print(f"5 bad cluster descriptions, each one clear error, all within {elapsed:.0f} s")
