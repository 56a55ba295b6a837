"""User folders that used to fail silently (issue 11, items 3, 5, 6), without models.

- An ImageNet subset: the folder n01530575 (brambling, class 10) got its index from its position among
  the sorted train folders (1, 'goldfish', beside n01440764), so stage 2 trained on wrong targets.
- A truncated JPEG passed the header-only scan, was selected and killed synthesis naming no file.
- ImageNet val as extracted from its tar (one flat folder) gave "no images" and no way forward.
"""
import os
import sys

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from synood_jax.data import datasets as data, imagenet, loader as data_loader, prepare
from synood_jax.pipeline import run_context, stages
from synood_jax.pipeline.workdir import Workdir
from synood_jax.synthesis import sources, synthesize as synthesis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(path, seed, quality=90, size=(64, 48)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  x = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(x).save(path, format="JPEG", quality=quality)


def _warnings(fn):
  seen = []
  orig = absl_logging.warning
  absl_logging.warning = lambda msg, *a: seen.append(msg % a)
  try:
    out = fn()
  finally:
    absl_logging.warning = orig
  return out, seen


def test_wnid_list():
  w = imagenet.IMAGENET_WNIDS
  assert len(w) == len(set(w)) == 1000 and list(w) == sorted(w)
  assert (w[0], w[10], w[999]) == ("n01440764", "n01530575", "n15075141")
  names = imagenet.IMAGENET_CLASSES
  assert (names[0], names[10], names[999]) == ("tench", "brambling", "toilet paper")
  assert all(imagenet.WNID.fullmatch(x) for x in w)


def test_subset_keeps_imagenet_indices(tmp_path):
  root = tmp_path / "train"
  for i, wnid in enumerate(("n01440764", "n01530575")):
    for j in range(2):
      _jpeg(str(root / wnid / f"{wnid}_{j}.JPEG"), seed=10 * i + j)
  old = sources.select_sources(str(root), per_class=2)   # the sorted-folder default (what stages used)
  assert {r.class_name: r.class_index for r in old.records} == {"n01440764": 0, "n01530575": 1}
  # the sources stage now takes the index from the wnid, and says it is a subset
  sys.path.insert(0, ROOT)
  from configs import imagenet_vitb16
  c = imagenet_vitb16.get_config()
  c.data.train_root = str(root)
  c.sources.per_class = 2
  wd = Workdir(str(tmp_path / "run"))
  ctx = run_context.RunContext(c, wd)
  info = stages.select_sources(ctx)
  got = {r.class_name: r.class_index for r in sources.read_source_list(wd.sources)}
  assert got == {"n01440764": 0, "n01530575": 10}
  assert ctx.classnames[got["n01530575"]] == "brambling" and len(ctx.classnames) == 1000
  assert info["subset"] and info["classes"] == "2 of 1000 classes (ImageNet-1k wnids)"
  # one stray folder is an error naming it, not a shift of every label after it
  (root / "n01440764_old").mkdir()
  _jpeg(str(root / "n01440764_old" / "x.JPEG"), seed=99)
  with pytest.raises(ValueError, match=r"3 class folders for 1000 classes of ImageNet-1k wnids; folder\(s\) not "
                                       r"among them: n01440764_old\. train and val folders must be named by"):
    stages.select_sources(run_context.RunContext(c, wd))


def test_class_files(tmp_path):
  loc = tmp_path / "LOC_synset_mapping.txt"       # '<wnid> <name>' lines: index = line
  loc.write_text("n01530575 brambling, Fringilla montifringilla\nn01440764 tench, Tinca tinca\n")
  idx = imagenet.class_index(["n01440764", "n01530575"], str(loc))
  assert idx.index == {"n01530575": 0, "n01440764": 1} and idx.names[0] == "brambling, Fringilla montifringilla"
  assert imagenet.class_names(str(loc)) == list(idx.names)
  tab = tmp_path / "classes.tsv"                  # '<folder>\t<name>': any folder names
  tab.write_text("cats\ta cat\ndogs\ta dog\nbirds\ta bird\n")
  idx = imagenet.class_index(["dogs", "birds"], str(tab))
  assert idx.index == {"dogs": 1, "birds": 2} and idx.subset and idx.names == ("a cat", "a dog", "a bird")
  plain = tmp_path / "names.txt"                  # one name per line: folders named like the classes
  plain.write_text("stripes\nrings\n")
  assert imagenet.class_index(["rings"], str(plain)).index == {"rings": 1}
  with pytest.raises(ValueError, match=r"3 class folders for 2 classes of class names .*names.txt; folder\(s\) "
                                       r"not among them: blobs"):
    imagenet.class_index(["rings", "stripes", "blobs"], str(plain))
  assert imagenet.class_index(["b", "a"], "folders").index == {"a": 0, "b": 1}


def test_truncated_jpeg_is_skipped_everywhere(tmp_path):
  root = tmp_path / "train"
  _jpeg(str(root / "c" / "big.JPEG"), seed=0, quality=98, size=(96, 96))    # the most bytes per pixel
  for i in range(3):
    _jpeg(str(root / "c" / f"small{i}.JPEG"), seed=1 + i, quality=30 + 10 * i, size=(96, 96))
  whole = (root / "c" / "big.JPEG").read_bytes()
  (root / "c" / "big.JPEG").write_bytes(whole[:int(len(whole) * 0.8)])     # header intact, data cut
  path = str(root / "c" / "big.JPEG")
  # the header-only scan still ranks it first (what selected it before)
  assert sources.bytes_per_pixel(path) > max(sources.bytes_per_pixel(str(root / "c" / f"small{i}.JPEG"))
                                             for i in range(3))
  sel, seen = _warnings(lambda: sources.select_sources(str(root), per_class=2))
  assert [r.path for r in sel.records] == ["c/small2.JPEG", "c/small1.JPEG"]    # the next best instead
  assert [s.path for s in sel.skipped] == ["c/big.JPEG"] and "truncated" in sel.skipped[0].reason
  assert any(path in w and "does not decode" in w for w in seen)
  # synthesis (a file that broke after the sources stage): skipped with a warning naming it
  recs = [(sources.SourceRecord("c", 0, name, 1.0), p) for name, p in (("c/big.JPEG", "p"), ("c/small0.JPEG", "q"))]
  (images, kept), seen = _warnings(lambda: synthesis._load_images(recs, str(root), 32))
  assert [r.path for r, _ in kept] == ["c/small0.JPEG"] and images[0].shape == (32, 32, 3)
  assert any(path in w and "OSError" in w for w in seen)
  # evaluation: the loader leaves it out and names it
  ds = data.Dataset("x", [data.Record(str(root / "c" / f)) for f in ("small0.JPEG", "big.JPEG")])
  loader = data_loader.ImageLoader(ds, 2, lambda im: np.zeros((4, 4, 3), np.float32), num_threads=1)
  batches = list(loader)
  assert [f.path for f in loader.failures] == [path] and list(batches[0]["index"]) == [0]


def test_flat_val_folder_is_recognised_and_sorted(tmp_path):
  val = tmp_path / "val"
  wnids = ["n01440764", "n01530575", "n01530575"]
  for i in range(3):
    _jpeg(str(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG"), seed=i, size=(16, 16))
  with pytest.raises(data.DataError) as e:                       # before: "no images"
    prepare.prepare(prepare.mos_specs(imagenet_val=str(val)), str(tmp_path / "m"))
  msg = str(e.value)
  print(msg)
  assert "no class subfolders (3 images lie directly in it)" in msg
  assert f"python launch/prepare_data.py --sort_val={val} --val_labels=LOC_val_solution.csv" in msg
  with pytest.raises(ValueError, match="3 images lie directly in it.*--sort_val"):
    sources.select_sources(str(val))
  # Kaggle's LOC_val_solution.csv (rows in any order, boxes after the wnid)
  labels = tmp_path / "LOC_val_solution.csv"
  labels.write_text("ImageId,PredictionString\n" + "".join(
      f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4 {w} 5 6 7 8\n" for i, w in reversed(list(enumerate(wnids)))))
  assert prepare.sort_flat_val(str(val), str(labels)) == {"n01440764": 1, "n01530575": 2}
  assert sorted(os.listdir(val)) == ["n01440764", "n01530575"]
  ds = data.image_folder(str(val), flat=False)
  index = imagenet.class_index(ds.classes).index                  # ImageNet indices, not folder positions
  assert sorted(index[ds.classes[r.label]] for r in ds.records) == [0, 10, 10]
  # the other layouts: one wnid per line, '<file> <class index>' lines; unknown labels stop before moving
  flat2 = tmp_path / "v2"
  for i in range(2):
    _jpeg(str(flat2 / f"ILSVRC2012_val_{i + 1:08d}.JPEG"), seed=i, size=(8, 8))
  names = sorted(os.listdir(flat2))
  assert prepare.read_val_labels(_text(tmp_path / "a.txt", "n01440764\nn15075141\n"), names) == dict(
      zip(names, ["n01440764", "n15075141"]))
  assert prepare.read_val_labels(_text(tmp_path / "b.txt", f"{names[1]} 10\n{names[0]} 0\n"), names) == {
      names[0]: "n01440764", names[1]: "n01530575"}
  with pytest.raises(data.DataError, match="not ImageNet-1k wnids: \\['n99999999'\\]"):
    prepare.sort_flat_val(str(flat2), _text(tmp_path / "c.txt", "n01440764\nn99999999\n"))
  assert sorted(os.listdir(flat2)) == names                        # nothing moved


def _text(path, text):
  path.write_text(text)
  return str(path)
