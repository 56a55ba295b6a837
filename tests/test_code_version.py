"""Outputs know the code that made them (issue 19, case 2).

Before: doubling the loss in `synthesis/refinement.py` and rerunning a finished workdir printed 11
"already done" lines; a synthesis killed at 16/32, edited and resumed said "16 done, 16 to go" and mixed
images of two code versions in one manifest. Here a temporary copy of the package is really edited
between runs of `runner.run` (in subprocesses importing the copy; the stage functions are recorders)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

from synood_jax.pipeline import code_version, provenance
from synood_jax.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {pkg!r})
    sys.path.insert(1, {root!r})
    from configs import demo
    import dataclasses
    from synood_jax.pipeline import runner, stages
    assert stages.__file__.startswith({pkg!r}), stages.__file__
    W, ran = {workdir!r}, []
    def fake(name):
      def fn(ctx):
        ran.append(name)
        if name == "synthesis":
          os.makedirs(ctx.wd.synthesis, exist_ok=True)
          open(os.path.join(ctx.wd.synthesis, "image_%d.png" % len(os.listdir(ctx.wd.synthesis))), "w").close()
          if os.environ.get("KILL_SYNTHESIS"):  # as if killed half way: a partial output, no done marker
            os._exit(9)
        return {{}}
      return fn
    for name in stages.STAGES:
      stages.BY_NAME[name] = dataclasses.replace(stages.BY_NAME[name], run=fake(name))
    c = demo.get_config()
    c.on_change = os.environ.get("ON_CHANGE", "rerun")
    runner.run(c, W)
    print("RAN", json.dumps(ran))
""")


def _run(pkg, workdir, **env):
  proc = subprocess.run([sys.executable, "-c", RUN.format(pkg=pkg, root=ROOT, workdir=workdir)],
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, capture_output=True, text=True,
                        timeout=300)
  ran = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RAN ")]
  return proc, (ran[0] if ran else None)


def _edit(pkg):
  path = os.path.join(pkg, "synood_jax", "synthesis", "refinement.py")
  text = open(path).read()
  assert "    return (target - s) ** 2\n" in text
  with open(path, "w") as f:  # the edit: double the squared loss
    f.write(text.replace("    return (target - s) ** 2\n", "    return 2.0 * (target - s) ** 2\n", 1))


def test_edited_source_reruns_and_restarts(tmp_path):
  pkg = str(tmp_path / "pkg")
  shutil.copytree(os.path.join(ROOT, "synood_jax"), os.path.join(pkg, "synood_jax"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  wd = Workdir(str(tmp_path / "w"))
  proc, ran = _run(pkg, wd.root)
  assert proc.returncode == 0 and len(ran) == 11, proc.stderr[-3000:]
  config = json.load(open(wd.config))
  assert config["code"]["sha256"] == code_version.current(os.path.join(pkg, "synood_jax"))["sha256"]
  assert config["code"]["git"] is None and config["code"]["files"] > 50     # a copy outside git
  proc, ran = _run(pkg, wd.root)
  assert ran == [], proc.stderr[-3000:]                                      # same code: all skipped

  _edit(pkg)
  proc, ran = _run(pkg, wd.root, ON_CHANGE="error")                          # refused, nothing runs
  assert proc.returncode != 0 and ran is None
  assert "synthesis: code changed: synood_jax/synthesis/refinement.py" in proc.stderr, proc.stderr[-3000:]
  proc, ran = _run(pkg, wd.root)
  assert ran == ["models", "data", "sources", "synthesis", "negatives", "features", "stage2", "stage3",
                 "export", "evaluate", "report"], proc.stderr[-3000:]
  assert ("stage synthesis: inputs changed since it ran, re-running it (code changed: "
          "synood_jax/synthesis/refinement.py; input stage data changed;") in proc.stderr
  done = json.load(open(wd.done("synthesis")))["provenance"]["code"]
  assert done["files"]["synood_jax/synthesis/refinement.py"] == \
      code_version.file_hashes(os.path.join(pkg, "synood_jax"))["synood_jax/synthesis/refinement.py"]

  # A synthesis killed half way, the code edited, then resumed: restarted, never mixed.
  os.remove(wd.done("synthesis"))
  proc, ran = _run(pkg, wd.root, KILL_SYNTHESIS="1")
  # same code: the killed stage resumed beside the first run's image
  assert proc.returncode == 9 and sorted(os.listdir(wd.synthesis)) == ["image_0.png", "image_1.png"]
  with open(os.path.join(pkg, "synood_jax", "synthesis", "refinement.py"), "a") as f:
    f.write("\n# edited again\n")
  proc, ran = _run(pkg, wd.root, ON_CHANGE="error")
  assert proc.returncode != 0 and "synthesis: code changed: synood_jax/synthesis/refinement.py" in proc.stderr
  proc, ran = _run(pkg, wd.root)
  assert "synthesis" in ran and os.listdir(wd.synthesis) == ["image_0.png"], (ran, os.listdir(wd.synthesis))
  assert "stage synthesis: inputs changed since it ran, re-running it (code changed" in proc.stderr


def test_code_changes_name_the_files():
  old = {"version": "0.1.0", "sha256": "a", "files": {"p/a.py": "1", "p/b.py": "2", "p/c.txt": "3"}}
  new = {"version": "0.1.0", "sha256": "b", "files": {"p/a.py": "1", "p/b.py": "9", "p/d.py": "4"}}
  fp = provenance.Fingerprint("new", {}, {}, 1, new)
  assert provenance.changes({"fingerprint": "old", "fields": {}, "upstream": {}, "version": 1, "code": old}, fp) \
      == ["code changed: p/b.py, p/c.txt (removed), p/d.py (added)"]
  assert provenance.changes({"fingerprint": "old", "fields": {}, "upstream": {}, "version": 1}, fp) \
      == ["no code version recorded (made by an older version)"]
  assert code_version.describe({"version": "0.1.0", "sha256": "0123456789abcdef", "files": 90,
                                "git": {"commit": "2112e9a0123456", "dirty": True}}) == \
      "synood-jax 0.1.0, sources sha256 0123456789ab (90 files), git 2112e9a012 + uncommitted changes"
