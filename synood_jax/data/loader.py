"""A threaded decode + preprocess loader over a `datasets.Dataset`, and a readability check.

The loader never drops an image silently: an image that cannot be read or decoded is left out of its
batch, and its path and error are kept in `ImageLoader.failures` and logged as an absl warning.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import logging

from synood_jax import parallel
from synood_jax.data.datasets import Dataset, DataError


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
    return parallel.ceil_div(len(self.dataset), self.batch_size)

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
