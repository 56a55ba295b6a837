"""Turn local downloads into checked dataset manifests before any evaluation.

Inputs: the ImageNet val folder (class subfolders), the MOS OOD subsets (iNaturalist, SUN, Places,
Textures: folders of images), OpenOOD v1.5 image lists with their image root. Outputs, in `out_dir`:
one `<set>.jsonl` manifest per set (`synood_jax.data.datasets.write_manifest`), `index.json` (the sets, their
roles and counts) and `prepare_report.json` (every missing or unreadable file by path, every count
mismatch). Missing or unreadable files and count mismatches raise `DataError` naming them, unless
`allow_partial` (then bad files are left out of the manifests and the problems are logged).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import logging

from synood_jax import fileio
from synood_jax.data import datasets as data, loader

# Expected image counts (MOS benchmark subsets as released; ImageNet-1k val): a set under one of these
# names with fewer images is shown as partial ("SUN (8 of 10,000)").
EXPECTED_COUNTS = {
    "imagenet_val": 50_000,
    "inaturalist": 10_000,
    "sun": 10_000,
    "places": 10_000,
    "textures": 5_640,
}
EXPECTED_CLASSES = {"imagenet_val": 1000}


@dataclasses.dataclass
class SetSpec:
  """One set to prepare. kind: 'folder' (class subfolders), 'flat_folder', 'openood_list', 'tfds'."""
  name: str
  kind: str
  root: str = ""
  list_path: str = ""
  role: str = "ood"                # 'id' or 'ood'
  expected: int | None = None      # None: EXPECTED_COUNTS[name], or the list's line count
  split: str = ""                  # tfds (root: the registered name or the builder directory)

  def load(self) -> data.Dataset:
    if self.kind == "folder":
      return data.image_folder(self.root, self.name, flat=False)
    if self.kind == "flat_folder":
      return data.image_folder(self.root, self.name, flat=True)
    if self.kind == "openood_list":
      return data.image_list(self.list_path, self.root, self.name, ood=self.role == "ood")
    if self.kind == "tfds":
      return data.load_dataset({"kind": "tfds", "dataset": self.root, "split": self.split,
                                "ood": self.role == "ood"}, self.name)
    raise data.DataError(f"set {self.name}: unknown kind {self.kind!r}")

  def expected_count(self) -> int | None:
    if self.expected is not None:
      return self.expected
    if self.kind == "openood_list":
      return data.count_list_lines(self.list_path)
    return EXPECTED_COUNTS.get(self.name.lower())


@dataclasses.dataclass
class PrepareReport:
  sets: dict                       # name -> {manifest, role, count, expected, classes}
  missing: dict                    # name -> [paths]
  unreadable: dict                 # name -> [{path, error}]
  count_errors: list               # human-readable lines

  @property
  def ok(self) -> bool:
    return not (any(self.missing.values()) or any(self.unreadable.values()) or self.count_errors)

  def problems(self, limit: int = 20) -> str:
    lines = list(self.count_errors)
    for name, paths in self.missing.items():
      for p in paths[:limit]:
        lines.append(f"{name}: missing {p}")
      if len(paths) > limit:
        lines.append(f"{name}: ... {len(paths) - limit} more missing")
    for name, bad in self.unreadable.items():
      for b in bad[:limit]:
        lines.append(f"{name}: unreadable {b['path']} ({b['error']})")
      if len(bad) > limit:
        lines.append(f"{name}: ... {len(bad) - limit} more unreadable")
    return "\n".join(lines)


def expected_images(name: str, dataset: data.Dataset) -> int | None:
  """How many images the full set has: as its manifest says, else by benchmark name (None: unknown)."""
  if dataset.expected is not None:
    return int(dataset.expected)
  return EXPECTED_COUNTS.get(name.lower())


def mos_specs(imagenet_val: str | None = None, inaturalist: str | None = None, sun: str | None = None,
              places: str | None = None, textures: str | None = None) -> list[SetSpec]:
  """Specs for the MOS benchmark from the folders the user has (None: skipped)."""
  specs = []
  if imagenet_val:
    specs.append(SetSpec("imagenet_val", "folder", imagenet_val, role="id"))
  for name, root in (("inaturalist", inaturalist), ("sun", sun), ("places", places),
                     ("textures", textures)):
    if root:
      specs.append(SetSpec(name, "flat_folder", root, role="ood"))
  return specs


def openood_specs(list_dir: str, image_root: str, names: dict[str, str] | Sequence[str],
                  id_names: Sequence[str] = ()) -> list[SetSpec]:
  """Specs for OpenOOD v1.5 lists: `names` maps set name -> list file (relative to `list_dir`)."""
  if not isinstance(names, dict):
    names = {os.path.splitext(os.path.basename(n))[0]: n for n in names}
  return [SetSpec(name, "openood_list", image_root, os.path.join(list_dir, rel),
                  role="id" if name in id_names else "ood") for name, rel in names.items()]


def prepare(specs: Sequence[SetSpec], out_dir: str, *, allow_partial: bool = False,
            verify: str = "header", num_threads: int | None = None) -> PrepareReport:
  """Check every set (files present and readable, counts as expected), then write manifests.

  verify: 'exists' (only that files exist), 'header' (PIL opens and verifies them), 'decode' (full decode).
  The report is written to `out_dir/prepare_report.json` first, then `DataError` is raised if there are
  problems and not `allow_partial`; in that case no manifest is written.
  """
  if verify not in ("exists", "header", "decode"):
    raise ValueError(f"verify must be 'exists', 'header' or 'decode', got {verify!r}")
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"set names must be unique, got {names}")
  os.makedirs(out_dir, exist_ok=True)
  report = PrepareReport({}, {}, {}, [])
  datasets = {}
  for spec in specs:
    try:
      ds = spec.load()
    except (data.DataError, OSError) as e:
      report.count_errors.append(f"{spec.name}: cannot list ({e})")
      continue
    expected = spec.expected_count()
    missing = data.missing_files(ds)
    bad = []
    if verify != "exists":
      missing_set = set(missing)
      todo = [i for i, r in enumerate(ds.records) if r.path not in missing_set]
      bad = loader.check_readable(ds, decode=verify == "decode", num_threads=num_threads, indices=todo)
    report.missing[spec.name] = missing
    report.unreadable[spec.name] = [{"path": f.path, "error": f.error} for f in bad]
    if expected is not None and len(ds) != expected:
      report.count_errors.append(f"{spec.name}: {len(ds)} images found in {ds.origin}, expected {expected}")
    want_classes = EXPECTED_CLASSES.get(spec.name.lower())
    if want_classes and ds.classes is not None and len(ds.classes) != want_classes:
      report.count_errors.append(f"{spec.name}: {len(ds.classes)} class folders in {ds.origin}, "
                                 f"expected {want_classes}")
    drop = set(missing) | {f.path for f in bad}
    good = [r for r in ds.records if r.path not in drop]
    datasets[spec.name] = (spec, data.Dataset(ds.name, good, ds.classes, ds.origin, expected=expected),
                           len(ds), expected)
    logging.info("%s: %d listed, %d missing, %d unreadable (expected %s)", spec.name, len(ds),
                 len(missing), len(bad), expected)

  for name, (spec, ds, listed, expected) in datasets.items():
    report.sets[name] = {"manifest": os.path.join(out_dir, f"{name}.jsonl"), "role": spec.role,
                         "count": len(ds), "listed": listed, "expected": expected,
                         "classes": len(ds.classes) if ds.classes else None, "origin": ds.origin,
                         "fingerprint": ds.fingerprint()}
  fileio.write_json(os.path.join(out_dir, "prepare_report.json"), dataclasses.asdict(report) | {"ok": report.ok})

  if not report.ok:
    if not allow_partial:
      raise data.DataError(f"data check failed (full list: {out_dir}/prepare_report.json):\n"
                           f"{report.problems()}")
    logging.warning("allow_partial: going on despite:\n%s", report.problems())
  for name, (spec, ds, _, _) in datasets.items():
    data.write_manifest(ds, report.sets[name]["manifest"])
  fileio.write_json(os.path.join(out_dir, "index.json"), {"sets": report.sets})
  return report


# ------------------------------------------------------------------------------------------------
# ImageNet val as extracted from its tar: one flat folder -> wnid subfolders.

def read_val_labels(path: str, files: Sequence[str]) -> dict[str, str]:
  """{file name: wnid} for the flat val images `files` (base names), from a standard labels file:
  Kaggle's LOC_val_solution.csv (`ImageId,PredictionString` rows), `<file> <wnid or class index>` lines
  (class index = position in the sorted wnids, as caffe's val.txt), or one wnid per line in file-name
  order (TF-slim's imagenet_2012_validation_synset_labels.txt)."""
  from synood_jax.data import imagenet
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  by_stem = {os.path.splitext(n)[0]: n for n in files}
  out: dict[str, str] = {}
  if lines and lines[0].replace(" ", "").lower().startswith("imageid,"):
    for lineno, line in enumerate(lines[1:], 2):
      stem, _, pred = line.partition(",")
      if not pred.split():
        raise data.DataError(f"{path}:{lineno}: no label in {line!r}")
      if stem in by_stem:
        out[by_stem[stem]] = pred.split()[0]
  elif lines and all(len(line.split()) == 1 for line in lines):
    ordered = sorted(files)
    if len(lines) != len(ordered):
      raise data.DataError(f"{path}: {len(lines)} labels (one wnid per line, in file-name order) for "
                           f"{len(ordered)} images")
    out = dict(zip(ordered, lines))
  else:
    for lineno, line in enumerate(lines, 1):
      parts = line.split()
      if len(parts) < 2:
        raise data.DataError(f"{path}:{lineno}: expected '<file> <wnid or class index>', got {line!r}")
      name, label = os.path.basename(parts[0]), parts[1]
      if label.isdigit():
        if int(label) >= len(imagenet.IMAGENET_WNIDS):
          raise data.DataError(f"{path}:{lineno}: class index {label} is not below 1000")
        label = imagenet.IMAGENET_WNIDS[int(label)]
      key = name if name in files else by_stem.get(os.path.splitext(name)[0])
      if key:
        out[key] = label
  return out


def sort_flat_val(root: str, labels_file: str) -> dict[str, int]:
  """Move every image directly in `root` into `root/<wnid>/` (as ImageNet's valprep.sh does).

  Everything is checked before anything moves: every image needs a label, every label must be an
  ImageNet-1k wnid; otherwise DataError names the files. Returns {wnid: images}.
  """
  from synood_jax.data import imagenet
  if not os.path.isdir(root):
    raise data.DataError(f"{root}: not a directory")
  files = sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f)) and data._is_image(f))
  if not files:
    raise data.DataError(f"{root}: no images directly in the folder (already sorted?)")
  labels = read_val_labels(labels_file, files)
  unlabelled = [f for f in files if f not in labels]
  known = set(imagenet.IMAGENET_WNIDS)
  bad = sorted({w for w in labels.values() if w not in known})
  if unlabelled or bad:
    raise data.DataError(
        f"{root}: cannot sort with {labels_file}: " + "; ".join(
            ([f"{len(unlabelled)} image(s) without a label, e.g. {unlabelled[:5]}"] if unlabelled else [])
            + ([f"label(s) that are not ImageNet-1k wnids: {bad[:5]}"] if bad else [])))
  counts: dict[str, int] = {}
  for f in files:
    wnid = labels[f]
    os.makedirs(os.path.join(root, wnid), exist_ok=True)
    os.replace(os.path.join(root, f), os.path.join(root, wnid, f))
    counts[wnid] = counts.get(wnid, 0) + 1
  logging.info("%s: %d images sorted into %d wnid folders", root, len(files), len(counts))
  return counts
