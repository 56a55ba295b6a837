"""The evaluation's image sets: named by specs, every file checked before any model work, and counted
against the full benchmark sets (so a partial set is shown as one)."""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from absl import logging

from synood_jax.data import datasets as data, loader, prepare


def parse_sets(spec: str | Sequence[str] | Mapping[str, str], data_dir: str = "") -> dict[str, str]:
  """'a,b=spec_b' (or a list / dict) -> {name: spec}; a bare name is `<data_dir>/<name>.jsonl`."""
  if isinstance(spec, Mapping):
    items = list(spec.items())
  else:
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    items = []
    for p in (p.strip() for p in parts):
      if not p:
        continue
      name, _, s = p.partition("=")
      items.append((name.strip(), s.strip()))
  out = {}
  for name, s in items:
    if not s:
      if not data_dir:
        raise ValueError(f"set {name!r}: no spec given and config.data_dir is empty")
      s = os.path.join(data_dir, f"{name}.jsonl")
    if name in out:
      raise ValueError(f"set {name!r} given twice")
    out[name] = s
  return out


def load_sets(id_sets: Mapping[str, str], ood_sets: Mapping[str, str], *, allow_partial: bool = False,
              verify: str = "exists", num_threads: int | None = None) -> dict[str, data.Dataset]:
  """Load every set and check its files before any evaluation; raise naming each missing file."""
  sets, problems = {}, []
  for name, spec in {**id_sets, **ood_sets}.items():
    ds = data.load_dataset(spec, name)
    ds.name = name
    if name in ood_sets:  # a folder of OOD images may have subfolders (iNaturalist/images, dtd/images/*)
      ds.records = [data.Record(r.path, data.OOD_LABEL) for r in ds.records]
    if verify == "exists":
      bad = [loader.Failure(-1, p, "missing") for p in data.missing_files(ds)]
    else:
      bad = loader.check_readable(ds, decode=verify == "decode", num_threads=num_threads)
    for f in bad:
      problems.append(f"{name}: {f.error} {f.path}")
    if bad and allow_partial:
      drop = {f.path for f in bad}
      ds = dataclasses.replace(ds, records=[r for r in ds.records if r.path not in drop])
    sets[name] = ds
  if problems:
    msg = f"{len(problems)} file(s) missing or unreadable:\n" + "\n".join(problems[:100])
    if len(problems) > 100:
      msg += f"\n... and {len(problems) - 100} more"
    if not allow_partial:
      raise data.DataError(msg)
    logging.warning("allow_partial: left out %s", msg)
  return sets


def set_counts(sets: Mapping, feats: Mapping) -> dict:
  """{set: {found, listed, expected}}: images scored, records listed, images the full set has (by its
  manifest or benchmark name; None if unknown). `sets`: Datasets or precomputed `features.Features`.
  found < expected marks a partial set everywhere."""
  out = {}
  for name, f in feats.items():
    ds = sets[name]
    listed = len(ds) if isinstance(ds, data.Dataset) else int(f.features.shape[0])
    expected = prepare.expected_images(name, ds) if isinstance(ds, data.Dataset) else None
    out[name] = {"found": int(f.features.shape[0]), "listed": listed, "expected": expected}
    if expected and out[name]["found"] < expected:
      logging.warning("%s: a partial set (%d of %d images); its numbers are shown as such", name,
                      out[name]["found"], expected)
  return out
