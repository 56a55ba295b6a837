"""Runs the stages of `stages.TABLE` over one workdir, resumably.

Each stage writes into the workdir and then `done/<stage>.json` with the fingerprint of the config
fields it reads and of the stages it consumes (`provenance.py`), and of the code (`code_version.py`). A
rerun skips a finished stage while its fingerprint holds, and re-runs it and everything downstream when
a field it reads changed (or refuses, with `on_change='error'`). A stage that was killed picks up where
it stopped if its inputs are unchanged (synthesis by its manifest, training by its orbax checkpoints,
evaluation by its feature cache). Every value and path the config names is checked before the first
stage runs (`values.py`, `inputs.py`); one run holds the workdir at a time (`lock.py`).

Several processes (a pod): every process runs every stage (the models and collectives are shared),
each stage starts and ends with a barrier, and what to do with each stage is process 0's plan,
broadcast, so all processes always run the same stages. Shared files are written by process 0 only
(`fileio`); the infos count global results (the merged synthesis manifest).
"""
from __future__ import annotations

import dataclasses
import json
import time

from absl import logging

from synood_jax import fileio, runtime
from synood_jax.pipeline import code_version, inputs, lock, provenance, stages, staging, values
from synood_jax.pipeline.run_context import RunContext
from synood_jax.pipeline.workdir import Workdir


def fingerprints(config, code=None) -> dict[str, provenance.Fingerprint]:
  """Every stage's fingerprint from the table (with `code`, the code version's too)."""
  table = stages.TABLE
  return provenance.fingerprints(config, {s.name: s.reads for s in table}, {s.name: s.consumes for s in table},
                                 {s.name: s.version for s in table}, stages.NOT_RESULTS, code=code)


@dataclasses.dataclass
class Step:
  stage: str
  action: str             # 'skip' (done, same inputs), 'run' (new), 'resume' (started, same inputs), 'rerun'
  changes: list[str]      # why a 'rerun'


def plan(config, wd: Workdir, names: list[str]) -> tuple[dict, list[Step]]:
  """(fingerprints, what to do with each requested stage). Raises when a stage would read a stale or
  missing input that this run does not make, and (config.on_change='error') when a finished stage's
  inputs changed."""
  fps = fingerprints(config, code=code_version.current())
  steps, will_be_valid = [], set()
  done = {name: fileio.read_json(wd.done(name), default=None) for name in stages.STAGES}
  for name in stages.STAGES:
    if done[name] is not None and not provenance.changes(done[name].get("provenance"), fps[name]):
      will_be_valid.add(name)
  for name in names:
    if name in will_be_valid:
      steps.append(Step(name, "skip", []))
      continue
    if done[name] is not None:
      steps.append(Step(name, "rerun", provenance.changes(done[name].get("provenance"), fps[name])))
    else:
      started = fileio.read_json(wd.started(name), default=None)
      partial = any(fileio.exists(p) for p in stages.BY_NAME[name].outputs(wd))
      diff = provenance.changes(started, fps[name]) if (started or partial) else []
      steps.append(Step(name, "rerun", diff) if diff else Step(name, "resume" if started else "run", []))
    missing = [u for u in stages.BY_NAME[name].consumes if u not in will_be_valid]
    if missing:
      raise ValueError(f"stage {name} needs stage(s) {missing}, which are not done with this config and "
                       f"are not part of this run: add them to --stages (or run every stage)")
    will_be_valid.add(name)
  changed = [s for s in steps if s.action == "rerun"]
  if changed and config.get("on_change", "rerun") == "error":
    lines = [f"  {s.stage}: " + "; ".join(s.changes) for s in changed]
    raise ValueError(f"{wd.root}: the config changed for stage(s) made before (config.on_change=error):\n"
                     + "\n".join(lines) + "\nUse another --workdir, or --config.on_change=rerun to redo them.")
  return fps, steps


def run(config, workdir: str, names=None) -> dict:
  """Run the stages `names` (default: all) in order, skipping the finished ones whose inputs did not change.
  Returns each stage's info.

  On several processes every one calls this with the same arguments (the README's pod launch)."""
  names = list(names or stages.STAGES)
  unknown = [s for s in names if s not in stages.BY_NAME]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {stages.STAGES}")
  values.validate(config)  # every value, before any stage runs or any output is touched
  names = [s for s in stages.STAGES if s in names]  # stage order, whatever order they were given in
  wd = Workdir(workdir)
  if fileio.is_writer():
    fileio.makedirs(wd.root)
  runtime.check_shared_dir(wd.root)
  with lock.hold_for_job(wd.root):  # one run at a time: a second one refuses here, naming this one
    if fileio.is_writer():
      staging.recover(wd)
    runtime.barrier("pipeline: workdir recovered")
    fps, steps = plan(config, wd, names)
    # Process 0's plan for every process (each read the same markers, but one must decide).
    steps = [Step(**step) for step in runtime.gather_json([dataclasses.asdict(st) for st in steps])[0]]
    inputs.validate(config, [s.stage for s in steps if s.action != "skip"])  # before hours of work, not after
    if fileio.is_writer():
      fileio.write_json(wd.config, {**json.loads(config.to_json_best_effort(sort_keys=True)),
                                    "code": code_version.summary()}, sort_keys=True)
    ctx = RunContext(config, wd)
    infos = {step.stage: _run_stage(ctx, step, fps[step.stage]) for step in steps}
    runtime.barrier("pipeline: finished")
  return infos


def _run_stage(ctx: RunContext, step: Step, fp: provenance.Fingerprint) -> dict:
  """One stage between two barriers: process 0 clears stale outputs and marks it started before, and
  marks it done after every process finished it."""
  name, wd = step.stage, ctx.wd
  if step.action == "skip":
    logging.info("stage %s: already done with this config (%s)", name, wd.done(name))
    return fileio.read_json(wd.done(name), default=None)
  if step.action == "rerun":
    logging.warning("stage %s: inputs changed since it ran, re-running it (%s)", name, "; ".join(step.changes))
  folders = stages.BY_NAME[name].outputs(wd)
  # A finished stage's outputs stay until its rerun's are complete: the rerun writes beside them.
  beside = runtime.agreed(bool(step.action == "rerun" and folders and fileio.exists(wd.done(name))))
  if fileio.is_writer():
    if beside:
      started = fileio.read_json(wd.started(name), default=None) or {}
      staging.prepare(wd, name, folders, resume=started.get("fingerprint") == fp.value)
    else:
      for path in [wd.done(name), *folders] if step.action == "rerun" else []:
        fileio.remove(path)
    fileio.write_json(wd.started(name), fp.as_dict(), sort_keys=True)
  runtime.barrier(f"stage {name}: start")
  start = time.perf_counter()
  logging.info("stage %s: %s", name, "resuming" if step.action == "resume" else "starting")
  ctx.wd = staging.staged(wd, folders) if beside else wd
  try:
    info = stages.BY_NAME[name].run(ctx) or {}
  finally:
    ctx.wd = wd
  info["seconds"] = round(time.perf_counter() - start, 2)
  info["provenance"] = fp.as_dict()
  runtime.barrier(f"stage {name}: end")  # every process's files are in place before the marker
  if beside:
    info = staging.final_paths(info, wd)  # its paths as they are after the swap
  if fileio.is_writer():
    if beside:
      staging.swap(wd, name, folders, info)
    else:
      fileio.write_json(wd.done(name), info, sort_keys=True)
  logging.info("stage %s: done in %.1f s", name, info["seconds"])
  return info
