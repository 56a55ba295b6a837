"""The version of the code a run executes: the package version, a hash of every source and data file of
the package, and the git commit (when the package is in a git checkout).

Every stage's fingerprint includes the files' hash (`provenance.fingerprints(code=...)`), so outputs made
by other code are never reused: a finished stage reruns, and a killed one restarts instead of resuming
into a mix of two versions' outputs. The hash covers the whole package, not the files each stage
imports: a per-stage file set would need an import graph that lazy imports and the shared `stages.py`
make easy to get wrong, and a wrong set would reuse stale outputs without a word. The cost is that an
edit anywhere reruns every stage; the log names the files that changed.

The git commit is recorded (config.json, the report, the export) but not fingerprinted: the files are
what runs, whatever the commit says, and a copy of the package outside git has none.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../synood_jax
SUFFIXES = (".py", ".txt", ".json")  # sources and package data (class names, templates)


def file_hashes(package_dir: str = PACKAGE_DIR) -> dict[str, str]:
  """{'synood_jax/<relative path>': sha256 prefix} of every source and data file of the package."""
  base = os.path.dirname(package_dir)
  out = {}
  for folder, dirs, files in os.walk(package_dir):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
    for name in sorted(files):
      if name.endswith(SUFFIXES):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, base).replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()[:16]
  return out


def package_version() -> str:
  try:
    return importlib.metadata.version("synood-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


def git_commit(package_dir: str = PACKAGE_DIR) -> dict | None:
  """{'commit', 'dirty'} of the checkout holding the package, or None outside git."""
  def git(*args):
    return subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True, timeout=20,
                          check=True).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=None)
def current(package_dir: str = PACKAGE_DIR) -> dict:
  """{'version', 'sha256' (over every file hash), 'files'} of the code this process runs (read once per
  process: a run executes the code it imported, whatever happens to the files meanwhile)."""
  files = file_hashes(package_dir)
  digest = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
  return {"version": package_version(), "sha256": digest, "files": files}


def summary(package_dir: str = PACKAGE_DIR) -> dict:
  """What config.json, the report and the export record: version, hash, file count, git commit."""
  code = current(package_dir)
  return {"package": "synood-jax", "version": code["version"], "sha256": code["sha256"],
          "files": len(code["files"]), "git": git_commit(package_dir)}


def describe(summary_: dict | None) -> str:
  """One line: 'synood-jax 0.1.0, sources sha256 0123456789ab (93 files), git 2112e9a0 (+ uncommitted changes)'."""
  if not summary_:
    return "not recorded (made by an older version)"
  git = summary_.get("git")
  where = (f"git {git['commit'][:10]}" + (" + uncommitted changes" if git.get("dirty") else "")) if git else "no git checkout"
  return (f"{summary_.get('package', 'synood-jax')} {summary_.get('version')}, sources sha256 "
          f"{str(summary_.get('sha256'))[:12]} ({summary_.get('files')} files), {where}")


def changed_files(old: dict, new: dict) -> list[str]:
  """Files edited, added or removed between two `files` tables, each marked."""
  out = []
  for k in sorted(set(old) | set(new)):
    if k not in old:
      out.append(f"{k} (added)")
    elif k not in new:
      out.append(f"{k} (removed)")
    elif old[k] != new[k]:
      out.append(k)
  return out
