"""Data loading, dataset preparation and the zero-shot evaluation, against numpy / sklearn."""
import dataclasses
import importlib.util
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from synood_jax.data import datasets as data, imagenet as imagenet_classes, loader as data_loader, prepare
from synood_jax.models import zero_shot
from synood_jax.ood import evaluation, features, results as result_tables, sets as eval_sets


def _noise_png(path, rng, color, size=40):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  x = np.clip(np.asarray(color)[None, None] + rng.normal(0, 40, (size, size + 8, 3)), 0, 255)
  Image.fromarray(x.astype(np.uint8)).save(path)


def _corrupt(path):
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def test_imagenet_classes():
  names = imagenet_classes.IMAGENET_CLASSES
  assert len(names) == 1000
  assert names[:3] == ("tench", "goldfish", "great white shark")
  assert names[-1] == "toilet paper"
  assert imagenet_classes.load_classnames("imagenet") == list(names)
  assert imagenet_classes.load_templates("neglabel") == ["the nice {}"]
  with pytest.raises(ValueError, match="no-such-file"):
    imagenet_classes.load_classnames("no-such-file")


def test_openood_list_parsing(tmp_path):
  lst = tmp_path / "test_x.txt"
  lst.write_text("imagenet/val/a b.JPEG 3\n\n# comment\nimagenet/val/c.JPEG 0\n")
  ds = data.image_list(str(lst), str(tmp_path / "root"))
  assert [(os.path.relpath(r.path, tmp_path / "root"), r.label) for r in ds.records] == [
      ("imagenet/val/a b.JPEG", 3), ("imagenet/val/c.JPEG", 0)]
  assert data.count_list_lines(str(lst)) == 2
  assert [r.label for r in data.image_list(str(lst), str(tmp_path), ood=True).records] == [-1, -1]
  assert data.missing_files(ds) == [r.path for r in ds.records]
  bad = tmp_path / "bad.txt"
  bad.write_text("a.png 1\nb.png x\n")
  with pytest.raises(data.DataError, match=r"bad.txt:2: label 'x'"):
    data.parse_image_list(str(bad), str(tmp_path))
  # Manifest round trip keeps order, labels and the fingerprint.
  data.write_manifest(ds, str(tmp_path / "m.jsonl"))
  back = data.read_manifest(str(tmp_path / "m.jsonl"))
  assert back.records == ds.records and back.fingerprint() == ds.fingerprint()


def test_corrupt_image_reported_by_path(tmp_path, caplog):
  rng = np.random.default_rng(0)
  for i in range(5):
    _noise_png(str(tmp_path / "ood" / f"{i}.png"), rng, (200, 30, 30))
  _corrupt(str(tmp_path / "ood" / "2.png"))
  with open(tmp_path / "ood" / "4.png", "r+b") as f:  # truncated
    f.truncate(60)
  ds = data.image_folder(str(tmp_path / "ood"))
  assert ds.classes is None and all(r.label == -1 for r in ds.records) and len(ds) == 5
  loader = data_loader.ImageLoader(ds, 2, lambda im: np.asarray(im.convert("RGB"), np.float32) / 255,
                            num_threads=2)
  with caplog.at_level(logging.WARNING):
    batches = list(loader)
  got = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(got, [0, 1, 3])
  for b in batches:
    for row, i in zip(b["image"], b["index"]):
      np.testing.assert_array_equal(row, np.asarray(Image.open(ds.records[i].path), np.float32) / 255)
  bad = sorted(f.path for f in loader.failures)
  assert bad == [str(tmp_path / "ood" / "2.png"), str(tmp_path / "ood" / "4.png")]
  assert str(tmp_path / "ood" / "2.png") in caplog.text and "2 of 5 images" in caplog.text
  assert sorted(f.path for f in data_loader.check_readable(ds, decode=True)) == bad


def test_prepare_counts_and_missing(tmp_path):
  rng = np.random.default_rng(1)
  for c in ("n01", "n02"):
    for i in range(3):
      _noise_png(str(tmp_path / "val" / c / f"{i}.png"), rng, (90, 90, 200))
  for i in range(4):
    _noise_png(str(tmp_path / "sun" / "images" / f"{i}.jpg"), rng, (30, 200, 30))
  (tmp_path / "lists").mkdir()
  (tmp_path / "lists" / "near.txt").write_text("sun/images/0.jpg 0\nsun/images/1.jpg 0\nsun/images/9.jpg 0\n")
  specs = [prepare.SetSpec("imagenet_val", "folder", str(tmp_path / "val"), role="id", expected=6),
           prepare.SetSpec("sun", "flat_folder", str(tmp_path / "sun"), expected=4),
           prepare.SetSpec("near", "openood_list", str(tmp_path), str(tmp_path / "lists" / "near.txt"))]
  out = tmp_path / "out"
  # A listed file that is not there: error naming it, no manifest written, report on disk.
  with pytest.raises(data.DataError) as e:
    prepare.prepare(specs, str(out))
  missing = str(tmp_path / "sun" / "images" / "9.jpg")
  assert f"near: missing {missing}" in str(e.value)
  # 2 class folders, not ImageNet's 1000: also reported.
  assert "imagenet_val: 2 class folders" in str(e.value)
  rep = json.loads((out / "prepare_report.json").read_text())
  assert rep["missing"]["near"] == [missing] and not rep["ok"]
  assert not (out / "sun.jsonl").exists()
  # Counts: SUN's default expectation is 10,000.
  with pytest.raises(data.DataError, match=r"sun: 4 images found in .*expected 10000"):
    prepare.prepare([prepare.SetSpec("sun", "flat_folder", str(tmp_path / "sun"))], str(out))
  # A corrupt file is reported by path too.
  _corrupt(str(tmp_path / "sun" / "images" / "3.jpg"))
  with pytest.raises(data.DataError, match="unreadable " + str(tmp_path / "sun" / "images" / "3.jpg")):
    prepare.prepare([specs[1]], str(out))
  # allow_partial: manifests without the bad files.
  r = prepare.prepare(specs, str(out), allow_partial=True)
  assert r.sets["near"]["count"] == 2 and r.sets["near"]["listed"] == 3 and r.sets["near"]["expected"] == 3
  assert r.sets["sun"]["count"] == 3
  val = data.read_manifest(str(out / "imagenet_val.jsonl"))
  assert val.classes == ["n01", "n02"] and sorted(set(val.labels.tolist())) == [0, 1]
  near = data.read_manifest(str(out / "near.jsonl"))
  assert [r.label for r in near.records] == [-1, -1]
  idx = json.loads((out / "index.json").read_text())
  assert set(idx["sets"]) == {"imagenet_val", "sun", "near"}


# ------------------------------------------------------------------------------------------------
# End to end on a tiny CLIP.

def _eval_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "evaluate_config", os.path.join(os.path.dirname(__file__), "..", "configs", "evaluate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _make_tiny_clip(folder):
  from synood_jax.demo import tiny_clip as tiny
  return tiny.make_tiny_clip(folder, seed=0)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
  for c, col in colors.items():
    for i in range(6):
      _noise_png(str(root / "id" / c / f"{i}.png"), rng, col)
  for i in range(7):
    _noise_png(str(root / "ood_a" / f"{i}.png"), rng, (128, 128, 128))
    _noise_png(str(root / "ood_b" / "sub" / f"{i}.jpg"), rng, (230, 200, 40), size=56)
  _corrupt(str(root / "ood_a" / "3.png"))
  (root / "neg.txt").write_text("the nice cloud\nthe nice rock\nThis is a dark photo\nthe nice sand\n"
                                "This is a bright photo\nthe nice tree\nthe nice car\n")
  clip_path = _make_tiny_clip(str(root / "clip"))
  config = _eval_config("runlocal")
  config.models.clip_path = clip_path
  config.eval.id_set = f"colors={root / 'id'}"
  config.eval.ood_sets = f"ood_a={root / 'ood_a'},ood_b={root / 'ood_b'}"
  config.data.classnames = str(root / "classes.txt")
  (root / "classes.txt").write_text("red\ngreen\nblue\n")
  config.negatives.label_list = str(root / "neg.txt")
  config.eval.groups = 2
  config.eval.batch_size = 8
  config.eval.score_batch_size = 32
  config.eval.num_threads = 2
  workdir = str(root / "work")
  results = evaluation.evaluate_config(config, workdir)  # what launch/evaluate.py runs
  return root, config, workdir, results


def _np_scores(img, id_text, neg_text, groups, temperature, mcm_temperature):
  """Independent numpy MCM and NegLabel (grouping: default_rng(0).permutation, remainder dropped);
  id_text: {method: its ID class features}."""
  def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
  img, neg_text = np.asarray(img, np.float64), np.asarray(neg_text, np.float64)
  mcm_text, neg_id = (np.asarray(id_text[m], np.float64) for m in ("mcm", "neglabel"))
  mcm = softmax(img @ mcm_text.T / mcm_temperature).max(axis=1)
  keep = len(neg_text) - len(neg_text) % groups
  perm = np.random.default_rng(0).permutation(keep).reshape(groups, -1)
  per_group = []
  for g in perm:
    p = softmax(np.concatenate([img @ neg_id.T, img @ neg_text[g].T], axis=1) / temperature)
    per_group.append(p[:, :len(neg_id)].sum(axis=1))
  return {"mcm": mcm, "neglabel": np.mean(per_group, axis=0)}


def _reference_metrics(s_id, s_ood, convention):
  """sklearn's AUROC / AP; FPR95 as each convention's peer computes it (tests/test_scores_metrics.py)."""
  from sklearn.metrics import average_precision_score, roc_auc_score
  from test_scores_metrics import _nearest_recall_fpr, _openood_fpr
  y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
  s = np.r_[s_id, s_ood]
  fpr95 = _nearest_recall_fpr(s_id, s_ood) if convention == "id_positive" else _openood_fpr(s_id, s_ood)
  return dict(fpr95=fpr95, auroc=roc_auc_score(y, s), aupr_in=average_precision_score(y, s),
              aupr_out=average_precision_score(1 - y, -s))


def _id_texts(workdir):
  with np.load(os.path.join(workdir, "text_features.npz")) as z:
    return {m: z[f"id_text/{m}"] for m in ("mcm", "neglabel")}, z["neg_text"]


def test_evaluate_outputs_match_sklearn(eval_run):
  root, config, workdir, results = eval_run
  on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert on_disk["methods"].keys() == {"mcm", "neglabel"}
  assert on_disk["ood_sets"] == ["ood_a", "ood_b"]
  assert on_disk["header"]["fpr95_rules"] == {"id_positive": "neglabel", "ood_positive": "openood"}
  # The corrupt OOD image is reported by path, and left out of the features.
  assert [f["path"] for f in on_disk["failures"]["ood_a"]] == [str(root / "ood_a" / "3.png")]
  assert on_disk["header"]["ood_counts"] == {"ood_a": 6, "ood_b": 7} and on_disk["header"]["id_count"] == 18
  id_text, neg_text = _id_texts(workdir)
  saved = np.load(os.path.join(workdir, "scores.npz"))
  feats = {}
  for name in ("colors", "ood_a", "ood_b"):
    with np.load(on_disk["cache"][name]) as z:  # raw embeddings are cached; the scores normalise them
      assert not np.allclose(np.linalg.norm(z["features"], axis=1), 1, atol=1e-3)
      feats[name] = z["features"] / np.linalg.norm(z["features"], axis=1, keepdims=True)
  assert feats["colors"].shape == (18, 16)
  scores = {name: _np_scores(f, id_text, neg_text, 2, 0.01, 1.0) for name, f in feats.items()}
  for method in ("mcm", "neglabel"):
    for name in feats:
      np.testing.assert_allclose(saved[f"{method}/{name}"], scores[name][method], rtol=1e-4, atol=1e-6)
    for conv in ("id_positive", "ood_positive"):
      per = on_disk["methods"][method][conv]
      ref = {s: _reference_metrics(saved[f"{method}/colors"], saved[f"{method}/{s}"], conv)
             for s in ("ood_a", "ood_b")}
      for s in ("ood_a", "ood_b"):
        for k, v in ref[s].items():
          np.testing.assert_allclose(per[s][k], v, rtol=1e-12, atol=1e-12, err_msg=f"{method} {conv} {s} {k}")
      for k in ref["ood_a"]:
        np.testing.assert_allclose(per["average"][k], (ref["ood_a"][k] + ref["ood_b"][k]) / 2, rtol=1e-12)
  # Zero-shot ID accuracy from the cached features, with each method's prompts. The cached labels index
  # the set's sorted folders (blue, green, red); the class names file says red, green, blue: a folder's
  # class is the name's line, not its position among the folders.
  folder = np.asarray(["blue", "green", "red"])[np.load(on_disk["cache"]["colors"])["labels"]]
  truth = np.asarray([["red", "green", "blue"].index(f) for f in folder])
  for m, t in id_text.items():
    assert on_disk["id_accuracy"][m] == pytest.approx(np.mean(np.argmax(feats["colors"] @ t.T, 1) == truth))


def test_each_method_prompts_as_its_paper(eval_run):
  from synood_jax.models import clip
  root, config, workdir, results = eval_run
  assert imagenet_classes.load_templates("mcm") == ["a photo of a {}"]  # MCM's prompt: no period
  id_text, neg_text = _id_texts(workdir)
  bundle = clip.from_pretrained(config.models.clip_path)
  for method, prompt in (("mcm", "a photo of a {}"), ("neglabel", "the nice {}")):
    prompts = [prompt.format(c) for c in ("red", "green", "blue")]
    want = zero_shot.encode_prompts(bundle, bundle.params, prompts, 8)
    np.testing.assert_allclose(id_text[method], want, atol=1e-6, err_msg=method)
  assert results["header"]["templates"] == {"mcm": ["a photo of a {}"], "neglabel": ["the nice {}"]}
  prompts = [line for line in (root / "neg.txt").read_text().splitlines()]
  np.testing.assert_allclose(neg_text, zero_shot.encode_prompts(bundle, bundle.params, prompts, 8), atol=1e-6)


def test_evaluate_report_files(eval_run):
  root, config, workdir, results = eval_run
  md = open(os.path.join(workdir, "results.md")).read()
  assert f"`{root / 'classes.txt'}`" in md
  assert "MCM 'a photo of a {}'; NegLabel 'the nice {}'" in md
  assert "operating point 'neglabel': recall nearest 0.95" in md and "operating point 'openood'" in md
  assert "| MCM |" in md and "| NegLabel |" in md and "ood_a" in md and "Average" in md
  fpr = results["methods"]["neglabel"]["id_positive"]["ood_b"]["fpr95"]
  assert f"{100 * fpr:.2f}" in md
  for f in ("roc_ood_a.png", "roc_ood_b.png", "hist_mcm.png", "hist_neglabel.png"):
    with Image.open(os.path.join(workdir, "plots", f)) as im:
      assert im.format == "PNG" and im.size[0] > 100


def test_evaluate_api_with_explicit_arguments(eval_run, tmp_path):
  """The API without a config: a CLIP bundle, sets, negatives and an extra score; then precomputed
  features and text, without a model."""
  from synood_jax.models import clip
  root, config, workdir, results = eval_run
  caches = {k: os.stat(v).st_mtime_ns for k, v in results["cache"].items()}
  bundle = clip.from_pretrained(config.models.clip_path)
  classnames = ["red", "green", "blue"]
  sets = evaluation.load_sets({"colors": str(root / "id")},
                              {"ood_a": str(root / "ood_a"), "ood_b": str(root / "ood_b")})
  negatives = evaluation.encode_negatives(bundle, classnames, label_list=str(root / "neg.txt"), batch_size=8)
  rot = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 16)))[0].astype(np.float32)
  options = evaluation.Options(groups=2, batch_size=8, score_batch_size=32,
                               cache_dir=os.path.join(workdir, "cache"))
  again = evaluation.evaluate(str(tmp_path / "a"), sets, "colors", clip=bundle, classnames=classnames,
                              negatives=negatives, options=options,
                              methods={"rotated_max_cos": lambda x: (x @ rot).max(axis=1)})
  assert {k: os.stat(v).st_mtime_ns for k, v in again["cache"].items()} == caches  # features from the cache
  for m in ("mcm", "neglabel"):
    assert again["methods"][m] == results["methods"][m]
  saved = np.load(str(tmp_path / "a" / "scores.npz"))
  with np.load(again["cache"]["ood_b"]) as z:
    f = z["features"]
  np.testing.assert_allclose(saved["rotated_max_cos/ood_b"], (f @ rot).max(1), rtol=1e-5)
  assert "| rotated_max_cos |" in open(tmp_path / "a" / "results.md").read()
  # Precomputed features and ID text: no model at all.
  feats = {k: features.load_cached(v) for k, v in results["cache"].items()}
  id_text, _ = _id_texts(workdir)
  third = evaluation.evaluate(str(tmp_path / "b"), feats, "colors", negatives=negatives, id_text=id_text,
                              options=dataclasses.replace(options, plots=False))
  assert third["methods"] == results["methods"] and third["header"]["model"] == "(precomputed features)"


def test_evaluate_errors_name_method_and_set(eval_run, tmp_path):
  root, config, workdir, results = eval_run
  feats = {k: features.load_cached(v) for k, v in results["cache"].items()}
  id_text = _id_texts(workdir)[0]
  bad = feats["ood_b"].features.copy()
  bad[2] = np.nan
  broken = {**feats, "ood_b": dataclasses.replace(feats["ood_b"], features=bad)}
  with pytest.raises(ValueError, match=r"method 'mcm', set 'ood_b': 1 of 7 scores are not finite \(first at "
                                       r"index 2"):
    evaluation.evaluate(str(tmp_path), broken, "colors", id_text=id_text,
                        options=evaluation.Options(scores=("mcm",), plots=False, score_batch_size=32))
  with pytest.raises(ValueError, match="needs `negatives`"):
    evaluation.evaluate(str(tmp_path), feats, "colors", id_text=id_text)
  with pytest.raises(ValueError, match="eval.fpr95_rules: id_positive='nearest'"):
    evaluation.Options(fpr95_rules={"id_positive": "nearest"})


def test_evaluate_stops_on_missing_file_before_model(tmp_path):
  rng = np.random.default_rng(5)
  for i in range(2):
    _noise_png(str(tmp_path / "ood" / f"{i}.png"), rng, (1, 2, 3))
  lst = tmp_path / "l.txt"
  lst.write_text("ood/0.png 0\nood/7.png 0\n")
  config = _eval_config()
  config.models.clip_path = str(tmp_path / "no-model")  # never reached
  config.eval.id_set = f"id=list:{lst}:{tmp_path}"
  config.eval.ood_sets = f"o={tmp_path / 'ood'}"
  with pytest.raises(data.DataError, match="missing " + str(tmp_path / "ood" / "7.png")):
    evaluation.evaluate_config(config, str(tmp_path / "work"))


def test_markdown_table_layout():
  results = {"ood_sets": ["inaturalist", "sun"], "conventions": ["id_positive"],
             "header": {"classnames": "imagenet", "templates": ["the nice {}"]},
             "methods": {"neglabel": {"id_positive": {
                 "inaturalist": dict(fpr95=0.0191, auroc=0.9949, aupr_in=0.9, aupr_out=0.8),
                 "sun": dict(fpr95=0.2053, auroc=0.9549, aupr_in=0.9, aupr_out=0.8),
                 "average": dict(fpr95=0.1122, auroc=0.9749, aupr_in=0.9, aupr_out=0.8)}}}}
  table = result_tables.metrics_table(results).splitlines()
  assert table[0] == ("| Method | iNaturalist FPR95↓ | iNaturalist AUROC↑ | SUN FPR95↓ | SUN AUROC↑ "
                      "| Average FPR95↓ | Average AUROC↑ |")
  assert table[1] == "|:---|:---:|:---:|:---:|:---:|:---:|:---:|"
  assert table[2] == "| NegLabel | 1.91 | 99.49 | 20.53 | 95.49 | 11.22 | 97.49 |"
  assert "the nice {}" in result_tables.markdown(results) and "imagenet" in result_tables.markdown(results)


def test_tfds_array_record_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  rng = np.random.default_rng(7)
  images = rng.integers(0, 255, (5, 20, 24, 3), dtype=np.uint8)

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(20, 24, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"image": images[i], "label": i % 3}

  builder = TinyImages(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  ds = data.load_dataset(f"tfds:{builder.data_dir}:test")
  assert ds.classes == ["a", "b", "c"] and len(ds) == 5
  order = [int(r.path.rsplit("#", 1)[1]) for r in ds.records]
  src = builder.as_data_source(split="test")
  assert [r.label for r in ds.records] == [int(src[i]["label"]) for i in order]
  assert not data.missing_files(ds)
  loader = data_loader.ImageLoader(ds, 2, lambda im: np.asarray(im, np.float32), num_threads=2)
  got = np.concatenate([b["image"] for b in loader])
  np.testing.assert_array_equal(got, np.stack([src[i]["image"] for i in order]).astype(np.float32))
  assert loader.failures == []
  ood = data.load_dataset({"kind": "tfds", "dataset": builder.data_dir, "split": "test", "ood": True}, "t")
  assert ood.name == "t" and set(ood.labels.tolist()) == {-1}


def test_partial_sets_are_named_as_such(tmp_path):
  """Issue 11, item 7. Before: a SUN folder of 8 images appeared as 'SUN' with a count only."""
  records = lambda n: [data.Record(f"/x/{i}.jpg") for i in range(n)]
  sets = {"imagenet_val": data.Dataset("imagenet_val", records(50)),         # benchmark name: 50,000
          "sun": data.Dataset("sun", records(8)),                            # benchmark name: 10,000
          "near": data.Dataset("near", records(3), expected=3),              # its manifest says 3
          "mine": data.Dataset("mine", records(4))}                          # unknown: never partial
  found = {"imagenet_val": 50, "sun": 7, "near": 3, "mine": 4}                # one SUN image unreadable
  feats = {k: features.Features(np.zeros((n, 2), np.float32), np.zeros(n), np.arange(n), [])
           for k, n in found.items()}
  counts = eval_sets.set_counts(sets, feats)
  assert counts == {"imagenet_val": {"found": 50, "listed": 50, "expected": 50_000},
                    "sun": {"found": 7, "listed": 8, "expected": 10_000},
                    "near": {"found": 3, "listed": 3, "expected": 3},
                    "mine": {"found": 4, "listed": 4, "expected": None}}
  assert [result_tables.set_label(k, counts) for k in counts] == ["imagenet_val (50 of 50,000)", "SUN (7 of 10,000)",
                                                           "near", "mine"]
  per = {"fpr95": 0.5, "auroc": 0.75, "aupr_in": 0.5, "aupr_out": 0.5}
  results = {"id_set": "imagenet_val", "ood_sets": ["sun", "near", "mine"], "conventions": ["id_positive"],
             "counts": counts, "methods": {"mcm": {"id_positive": {s: per for s in ["sun", "near", "mine", "average"]}}},
             "header": {"id_set": "imagenet_val", "id_count": 50, "ood_counts": {"sun": 7, "near": 3, "mine": 4}}}
  md = result_tables.markdown(results)
  assert "| Method | SUN (7 of 10,000) FPR95↓ | SUN (7 of 10,000) AUROC↑ | near FPR95↓" in md
  assert ("- ID set: `imagenet_val` (50 of 50,000 images: **partial**); OOD sets: `sun` (7 of 10,000 images: "
          "**partial**), `near` (3), `mine` (4)") in md
  titles = []
  orig = result_tables.plot_roc
  result_tables.plot_roc = lambda i, o, path, title, conv: titles.append(title)
  try:
    result_tables.write_plots({"mcm": {s: np.arange(4.0) for s in sets}}, "imagenet_val", ["sun"], str(tmp_path),
                       counts=counts)
  finally:
    result_tables.plot_roc = orig
  assert titles == ["ROC: imagenet_val (50 of 50,000) vs SUN (7 of 10,000)"]
  # prepare's manifests carry the expected size
  data.write_manifest(sets["near"], str(tmp_path / "near.jsonl"))
  assert data.read_manifest(str(tmp_path / "near.jsonl")).expected == 3
