"""A rerun never deletes a finished stage's outputs before the new ones are complete.

A finished stage that reruns (its config or code changed) writes its folders beside the finished ones,
under `<workdir>/rerun/` (a `Workdir` view with `beside` set), and only when it has finished are they
swapped in. Before, `synthesis.step_size=-inf` deleted the previous good synthesis (32 + 24 images) and
then the health check stopped the run: nothing usable was left. Now a failed rerun leaves the finished
outputs and their done marker as they were (still valid for the config they were made with), and a
killed rerun resumes in `rerun/` when run again with the same fingerprint.

The swap is made safe against a kill by a record written first, `rerun/<stage>.swap.json` (the folders
and the new done marker): from then on the new outputs are complete, so `recover` (at the start of every
run) finishes a swap that was interrupted. Process 0 does all of it, between barriers. On a local disk a
folder moves in one rename; on an object store (gs://) a "rename" copies every object, slower but
covered by the same record.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import logging

from synood_jax import fileio
from synood_jax.pipeline.workdir import RERUN, Workdir


def staged(wd: Workdir, folders: Sequence[str]) -> Workdir:
  """The view a rerun writes through: `folders` (the stage's output folders) under <root>/rerun/."""
  return dataclasses.replace(wd, beside=tuple(os.path.relpath(f, wd.root).split(os.sep)[0] for f in folders))


def _pairs(wd: Workdir, folders: Sequence[str]) -> list[tuple[str, str]]:
  """(finished folder, its rerun counterpart) for each folder."""
  return [(f, os.path.join(wd.root, RERUN, os.path.relpath(f, wd.root))) for f in folders]


def _record(wd: Workdir, stage: str) -> str:
  return wd.path(RERUN, f"{stage}.swap.json")


def prepare(wd: Workdir, stage: str, folders: Sequence[str], resume: bool) -> None:
  """Process 0, before a rerun: keep what an interrupted rerun with the same fingerprint wrote in
  rerun/ (`resume`), else clear it. The finished folders are not touched."""
  for _, new in _pairs(wd, folders):
    if not resume:
      fileio.remove(new)
  logging.info("stage %s: %s beside the finished outputs (in %s); they are replaced when it ends", stage,
               "resuming its rerun" if resume else "rerunning", wd.path(RERUN))


def swap(wd: Workdir, stage: str, folders: Sequence[str], done_info: dict) -> None:
  """Process 0, after every process finished the rerun: record, then swap in and mark done."""
  made = [old for old, new in _pairs(wd, folders) if fileio.exists(new)]
  fileio.write_json(_record(wd, stage), {"folders": list(folders), "made": made, "done": done_info})
  _finish(wd, stage)


def final_paths(obj, wd: Workdir):
  """`obj` (a stage's info) with every path into rerun/ replaced by where it is after the swap."""
  staged_prefix, final_prefix = wd.path(RERUN, ""), wd.path("")
  if isinstance(obj, str):
    return final_prefix + obj[len(staged_prefix):] if obj.startswith(staged_prefix) else obj
  if isinstance(obj, dict):
    return {k: final_paths(v, wd) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [final_paths(v, wd) for v in obj]
  return obj


def _finish(wd: Workdir, stage: str) -> None:
  record = fileio.read_json(_record(wd, stage))
  for old, new in _pairs(wd, record["folders"]):
    if old not in record["made"]:
      fileio.remove(old)  # the rerun makes no such folder (a config without held-out images): stale
    elif fileio.exists(new):  # not yet moved (else a killed swap moved it already)
      fileio.remove(old)
      fileio.path(new).rename(old)
  fileio.write_json(wd.done(stage), record["done"], sort_keys=True)
  fileio.remove(_record(wd, stage))


def recover(wd: Workdir) -> list[str]:
  """Process 0, at the start of a run: finish the swaps a killed run left half done. Returns the stages."""
  folder = wd.path(RERUN)
  if not fileio.exists(folder):
    return []
  stages = sorted(p.name[:-len(".swap.json")] for p in fileio.path(folder).glob("*.swap.json"))
  for stage in stages:
    logging.warning("stage %s: finishing the swap of its rerun's outputs that a killed run left half done", stage)
    _finish(wd, stage)
  return stages
