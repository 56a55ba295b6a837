"""Evaluation datasets as lists of (path, label) records, and a threaded decode + preprocess loader.

Sources:
  * image folders: class subfolders (sorted names -> labels 0..K-1, the ImageNet val layout) or flat
    folders (every image below the root, recursively, label -1: the MOS OOD sets);
  * OpenOOD v1.5 image lists: `relpath label` per line, paths relative to an image root;
  * JSONL manifests written by `synood_jax.data.prepare` (one `{"path", "label"}` object per line);
  * tfds datasets: array_record ones through `tfds.data_source` (no TensorFlow needed; tensorflow-datasets
    imported lazily), TFRecord ones through `tfds.load` only when TensorFlow is importable.

A record of a tfds dataset has the path `tfds://<name>/<split>#<index>`.

The loader never drops an image silently: an image that cannot be read or decoded is left out of its
batch, and its path and error are kept in `ImageLoader.failures` and logged as an absl warning.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import logging

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
    with Image.open(record.path) as im:
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    meta = {"name": dataset.name, "classes": dataset.classes, "origin": dataset.origin,
            "count": len(dataset), "expected": dataset.expected}
    f.write(json.dumps({"_meta": meta}) + "\n")
    for r in dataset.records:
      f.write(json.dumps({"path": r.path, "label": r.label}) + "\n")
  os.replace(tmp, path)


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
  return [r.path for r in dataset.records if not r.path.startswith("tfds://") and not os.path.isfile(r.path)]


# ------------------------------------------------------------------------------------------------
# Loader.

@dataclasses.dataclass
class Failure:
  index: int
  path: str
  error: str


class ImageLoader:
  """Decode + preprocess with a thread pool; yields {'image': f32 NHWC, 'label', 'index'} numpy batches.

  `preprocess` maps one PIL image (any mode) to a float32 HWC array. Images that fail are left out of their
  batch (so a batch may be short) and recorded in `self.failures` (index, path, error); a warning
  listing them is logged when iteration ends. `indices` in each batch say which records are present.
  """

  def __init__(self, dataset: Dataset, batch_size: int, preprocess: Callable[[Any], np.ndarray], *,
               num_threads: int | None = None, prefetch: int = 2):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.dataset = dataset
    self.batch_size = batch_size
    self.preprocess = preprocess
    self.num_threads = num_threads or min(16, (os.cpu_count() or 2) * 2)
    self.prefetch = max(1, prefetch)
    self.failures: list[Failure] = []

  def __len__(self) -> int:
    return -(-len(self.dataset) // self.batch_size)

  def _one(self, index: int):
    try:
      image = self.dataset.open_image(index)
      return np.asarray(self.preprocess(image), np.float32), None
    except Exception as e:  # noqa: BLE001 - any decode error is reported by path, never raised mid-run
      return None, f"{type(e).__name__}: {e}"

  def _batch(self, pool, start: int) -> dict[str, np.ndarray]:
    idx = range(start, min(start + self.batch_size, len(self.dataset)))
    results = list(pool.map(self._one, idx))
    images, labels, kept = [], [], []
    for i, (image, err) in zip(idx, results):
      if err is not None:
        self.failures.append(Failure(i, self.dataset.records[i].path, err))
        continue
      images.append(image)
      labels.append(self.dataset.records[i].label)
      kept.append(i)
    if images:
      shape = images[0].shape
      for i, im in zip(kept, images):
        if im.shape != shape:
          raise DataError(f"{self.dataset.records[i].path}: preprocessed to {im.shape}, batch has {shape}")
      images = np.stack(images)
    else:
      images = np.zeros((0,), np.float32)
    return {"image": images, "label": np.asarray(labels, np.int64), "index": np.asarray(kept, np.int64)}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self.failures = []
    starts = list(range(0, len(self.dataset), self.batch_size))
    out: queue.Queue = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce():
      try:
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
          for s in starts:
            if stop.is_set():
              return
            out.put(self._batch(pool, s))
        out.put(None)
      except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        out.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = out.get()
        if item is None:
          break
        if isinstance(item, BaseException):
          raise item
        if len(item["index"]):
          yield item
    finally:
      stop.set()
      while thread.is_alive():  # unblock a producer waiting on a full queue
        try:
          out.get(timeout=0.1)
        except queue.Empty:
          pass
      self.report()

  def report(self) -> None:
    if self.failures:
      shown = "\n".join(f"  {f.path}: {f.error}" for f in self.failures[:50])
      more = f"\n  ... and {len(self.failures) - 50} more" if len(self.failures) > 50 else ""
      logging.warning("%s: %d of %d images could not be read and were left out:\n%s%s",
                      self.dataset.name, len(self.failures), len(self.dataset), shown, more)


def check_readable(dataset: Dataset, *, decode: bool = False, num_threads: int | None = None,
                   indices: Sequence[int] | None = None) -> list[Failure]:
  """Failures (index, path, error) of records that are missing or not readable images.

  `decode=False` opens and verifies each file's header and structure (PIL `verify`, cheap);
  `decode=True` decodes every pixel (what the loader will do).
  """
  from PIL import Image

  def one(i):
    r = dataset.records[i]
    try:
      if r.path.startswith("tfds://"):
        if decode:
          dataset.open_image(i)
        return None
      if not os.path.isfile(r.path):
        return Failure(i, r.path, "missing")
      if decode:
        dataset.open_image(i)
      else:
        with Image.open(r.path) as im:
          im.verify()
      return None
    except Exception as e:  # noqa: BLE001
      return Failure(i, r.path, f"{type(e).__name__}: {e}")

  idx = range(len(dataset)) if indices is None else indices
  with concurrent.futures.ThreadPoolExecutor(num_threads or min(16, (os.cpu_count() or 2) * 2)) as pool:
    return [f for f in pool.map(one, idx) if f is not None]
