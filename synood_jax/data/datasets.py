"""Evaluation datasets as lists of (path, label) records (the threaded decode + preprocess loader: loader.py).

Sources:
  * image folders: class subfolders (sorted names -> labels 0..K-1, the ImageNet val layout) or flat
    folders (every image below the root, recursively, label -1: the MOS OOD sets);
  * OpenOOD v1.5 image lists: `relpath label` per line, paths relative to an image root;
  * JSONL manifests written by `synood_jax.data.prepare` (one `{"path", "label"}` object per line);
  * tfds datasets: array_record ones through `tfds.data_source` (no TensorFlow needed; tensorflow-datasets
    imported lazily), TFRecord ones through `tfds.load` only when TensorFlow is importable.

A record of a tfds dataset has the path `tfds://<name>/<split>#<index>`.

"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from synood_jax import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OOD_LABEL = -1


class DataError(ValueError):
  """Bad or missing data; the message names the files at fault."""


@dataclasses.dataclass(frozen=True)
class Record:
  path: str
  label: int = OOD_LABEL


@dataclasses.dataclass
class Dataset:
  """A named list of records; `source` holds a random-access tfds source for `tfds://` records."""
  name: str
  records: list[Record]
  classes: list[str] | None = None
  origin: str = ""             # where it came from (folder, list file, manifest, tfds name)
  source: Any = None           # tfds data source (random access), or None for files on disk
  image_key: str = "image"
  expected: int | None = None  # images the full set has (a partial set has fewer records), if known

  def __len__(self) -> int:
    return len(self.records)

  @property
  def labels(self) -> np.ndarray:
    return np.asarray([r.label for r in self.records], np.int64)

  def fingerprint(self) -> str:
    """sha256 over the ordered `path<TAB>label` lines: the key of anything computed from this set."""
    h = hashlib.sha256()
    for r in self.records:
      h.update(f"{r.path}\t{r.label}\n".encode("utf-8"))
    return h.hexdigest()

  def open_image(self, index: int):
    """The record's image, fully decoded, as a PIL image in its own mode (raises on corrupt data).

    The mode is kept (no RGB conversion here) so that the preprocessing treats alpha and palettes
    as CLIPImageProcessor does (`clip_preprocess.to_rgb_uint8`).
    """
    from PIL import Image
    record = self.records[index]
    if self.source is not None and record.path.startswith("tfds://"):
      example = self.source[int(record.path.rsplit("#", 1)[1])]
      image = np.asarray(example[self.image_key])
      if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
      return Image.fromarray(image)
    with fileio.open_file(record.path) as f, Image.open(f) as im:  # a workdir may be gs://
      im.load()  # a truncated or corrupt file raises here, not later in a worker
    return im


# ------------------------------------------------------------------------------------------------
# Sources.

def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
  return out


def flat_folder_message(root: str, what: str) -> str:
  """Why a folder without class subfolders cannot be a labelled (ID) set, and how to lay it out."""
  try:
    n = sum(1 for f in os.listdir(root) if _is_image(f))
  except OSError:
    n = 0
  found = f" ({n} images lie directly in it)" if n else ""
  return (f"{root}: {what}{found}. A labelled image set needs one subfolder per class: <root>/<wnid>/<image>. "
          "ImageNet val as extracted from ILSVRC2012_img_val.tar is one flat folder; sort it into wnid folders "
          f"with: python launch/prepare_data.py --sort_val={root} --val_labels=LOC_val_solution.csv (or a file "
          "with one wnid per line, in file-name order)")


def image_folder(root: str, name: str | None = None, *, flat: bool | None = None) -> Dataset:
  """Class subfolders (labels = sorted folder index, `classes` = the folder names) or, with `flat` (or
  no subfolder), OOD images.

  `flat=None` decides by layout: images directly in `root` and no subfolder -> flat; subfolders ->
  one class each. A flat folder takes every image below `root` (recursively), all labelled -1;
  `flat=False` on a folder without subfolders says how to lay it out. A label indexes `classes`; the
  class identity in a model's label space comes from the folder name (`imagenet.class_index`).
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DataError(f"image folder {root}: not a directory")
  name = name or os.path.basename(root.rstrip("/"))
  subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if flat is None:
    flat = not subdirs
  elif not flat and not subdirs:
    raise DataError(flat_folder_message(root, "no class subfolders"))
  if flat:
    records = [Record(p, OOD_LABEL) for p in _walk_images(root)]
    classes = None
  else:
    records, classes = [], subdirs
    for label, d in enumerate(subdirs):
      records.extend(Record(p, label) for p in _walk_images(os.path.join(root, d)))
  if not records:
    raise DataError(f"image folder {root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  return Dataset(name, records, classes, origin=root)


def parse_image_list(list_path: str, root: str) -> list[Record]:
  """OpenOOD v1.5 list: `relpath label` per line (the label is the last field; paths may hold spaces)."""
  records = []
  with open(list_path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.rsplit(maxsplit=1)
      if len(parts) != 2:
        raise DataError(f"{list_path}:{lineno}: expected 'relpath label', got {line!r}")
      rel, label = parts
      try:
        label = int(label)
      except ValueError:
        raise DataError(f"{list_path}:{lineno}: label {label!r} is not an integer") from None
      records.append(Record(os.path.join(root, rel), label))
  return records


def count_list_lines(list_path: str) -> int:
  with open(list_path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip() and not line.lstrip().startswith("#"))


def image_list(list_path: str, root: str, name: str | None = None, *, ood: bool = False) -> Dataset:
  """An OpenOOD v1.5 image list; `ood=True` relabels every record -1 (OpenOOD gives OOD lists -1 too)."""
  root = os.path.abspath(os.path.expanduser(root))
  records = parse_image_list(list_path, root)
  if ood:
    records = [Record(r.path, OOD_LABEL) for r in records]
  if not records:
    raise DataError(f"image list {list_path}: no records")
  name = name or os.path.splitext(os.path.basename(list_path))[0]
  return Dataset(name, records, origin=os.path.abspath(list_path))


def write_manifest(dataset: Dataset, path: str) -> None:
  """JSONL: a first `{"_meta": {...}}` line (name, classes, origin, count), then one record per line."""
  meta = {"name": dataset.name, "classes": dataset.classes, "origin": dataset.origin, "count": len(dataset),
          "expected": dataset.expected}
  lines = [json.dumps({"_meta": meta})] + [json.dumps({"path": r.path, "label": r.label}) for r in dataset.records]
  fileio.atomic_write(path, "\n".join(lines) + "\n")


def read_manifest(path: str, name: str | None = None) -> Dataset:
  """A JSONL manifest (the `_meta` line is optional; relative paths are relative to the manifest)."""
  base = os.path.dirname(os.path.abspath(path))
  records, meta = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not JSON ({e})") from None
      if "_meta" in obj:
        meta = obj["_meta"]
        continue
      if "path" not in obj:
        raise DataError(f"{path}:{lineno}: record without 'path'")
      p = obj["path"]
      records.append(Record(p if os.path.isabs(p) or p.startswith("tfds://") else os.path.join(base, p),
                            int(obj.get("label", OOD_LABEL))))
  if meta.get("count") is not None and meta["count"] != len(records):
    raise DataError(f"{path}: header says {meta['count']} records, file has {len(records)}")
  name = name or meta.get("name") or os.path.splitext(os.path.basename(path))[0]
  return Dataset(name, records, meta.get("classes"), origin=os.path.abspath(path), expected=meta.get("expected"))


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("tfds datasets need the optional 'data' extra: "
                      "pip install 'synood-jax[data]' (tensorflow-datasets, array-record)") from e
  return tfds


def tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


def tfds_dataset(name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
                 label_key: str | None = "label", ood: bool = False) -> Dataset:
  """A tfds dataset read by index: array_record through `tfds.data_source` (no TensorFlow).

  `name` is a registered name or a prepared builder directory (one holding `dataset_info.json`).
  TFRecord datasets are read (fully, into memory) through `tfds.load` only when TensorFlow is
  importable; otherwise they raise, saying so.
  """
  tfds = _import_tfds()
  if os.path.isdir(name):
    builder = tfds.builder_from_directory(name)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  fmt = str(getattr(builder.info, "file_format", "") or "").lower()
  display = builder.info.full_name if hasattr(builder.info, "full_name") else name
  if "array_record" in fmt:
    source = builder.as_data_source(split=split)
  elif tensorflow_available():
    ds = tfds.as_numpy(builder.as_dataset(split=split))
    source = [ex for ex in ds]  # random access for the loader
  else:
    raise DataError(f"tfds {display} [{split}]: stored as {fmt or 'tfrecord'}; reading it needs TensorFlow "
                    "(or re-prepare it with file_format='array_record')")
  n = len(source)
  labels = [OOD_LABEL] * n
  if label_key and not ood:
    if label_key not in builder.info.features:
      raise DataError(f"tfds {display}: no feature {label_key!r} (has {list(builder.info.features)})")
    labels_source = source
    if "array_record" in fmt:  # read labels without decoding every image
      try:
        labels_source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
      except Exception:  # noqa: BLE001 - decoding everything is slower but correct
        labels_source = source
    labels = [int(labels_source[i][label_key]) for i in range(n)]
  classes = None
  feature = builder.info.features[label_key] if label_key and label_key in builder.info.features else None
  if feature is not None and hasattr(feature, "names"):
    classes = list(feature.names)
  records = [Record(f"tfds://{display}/{split}#{i}", labels[i]) for i in range(n)]
  return Dataset(f"{builder.info.name}_{split}", records, classes,
                 origin=f"tfds:{display}/{split}", source=source, image_key=image_key)


def load_dataset(spec: str | dict, name: str | None = None) -> Dataset:
  """A dataset from a spec: a manifest `.jsonl`, an image folder, `list:<list file>:<root>`,
  `tfds:<name or builder dir>:<split>`, or a dict: {kind: 'manifest', path} | {kind: 'folder' |
  'flat_folder', root} | {kind: 'openood_list', list, root, ood} | {kind: 'tfds', dataset, split,
  data_dir, image_key, label_key, ood}; a dict's optional 'name' names the set."""
  if isinstance(spec, str):
    if spec.startswith("list:"):
      _, list_path, root = spec.split(":", 2)
      return image_list(list_path, root, name)
    if spec.startswith("tfds:"):
      _, tname, split = spec.split(":", 2)
      return tfds_dataset(tname, split)
    if spec.endswith(".jsonl"):
      return read_manifest(spec, name)
    if os.path.isdir(spec):
      return image_folder(spec, name)
    raise DataError(f"dataset {spec!r}: not a manifest (.jsonl), folder, 'list:' or 'tfds:' spec")
  spec = dict(spec)
  kind = spec.pop("kind")
  name = spec.pop("name", name)
  if kind == "manifest":
    return read_manifest(spec["path"], name)
  if kind in ("folder", "image_folder"):
    return image_folder(spec["root"], name, flat=spec.get("flat"))
  if kind == "flat_folder":
    return image_folder(spec["root"], name, flat=True)
  if kind == "openood_list":
    return image_list(spec["list"], spec["root"], name, ood=spec.get("ood", False))
  if kind == "tfds":
    ds = tfds_dataset(spec["dataset"], spec["split"], spec.get("data_dir"),
                      image_key=spec.get("image_key", "image"), label_key=spec.get("label_key", "label"),
                      ood=spec.get("ood", False))
    if name:
      ds.name = name
    return ds
  raise DataError(f"dataset spec {spec}: unknown kind {kind!r}")


def missing_files(dataset: Dataset) -> list[str]:
  """Paths of records that are not files on disk (tfds records are never missing)."""
  return [r.path for r in dataset.records if not r.path.startswith("tfds://") and not fileio.exists(r.path)]
