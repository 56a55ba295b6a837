"""Zero-shot OOD evaluation: features once (cached), MCM and NegLabel side by side, both conventions.

  S_MCM(x) = max_c softmax(cos(f(x), t_c) / T_MCM);   S_NegLabel(x) = 1/G sum_g sum_{c in ID} softmax([cos_ID, cos_{N_g}] / T)_c

`evaluate(config, workdir)`:
  1. loads the ID and OOD sets and stops, naming every missing file, before any model work;
  2. encodes the ID class prompts and the negative labels (a label list, or mined from a corpus);
  3. extracts L2-normalised image features once per set, sharded over the mesh, cached on disk as
     npz keyed by (set fingerprint, model folder and its weights, preprocessing, dtype);
  4. scores every set with each method, computes metrics per OOD set and their average in both
     conventions (ID positive as MOS/MCM/NegLabel; OOD positive as OpenOOD v1.5);
  5. writes results.json, results.md (Table 1 layout), scores.npz and PNG plots to `workdir`.

Hooks for the tuned stages: `image_transform` (a callable on image features, e.g. SynOOD's
f' = normalize(f + P(f))) and `negative_features` (tuned negative text features [M, D]) add a
method (config.tuned_method, default 'synood') = NegLabel's score on the transformed features
against the tuned negatives; `extra_methods` maps names to `fn(image_features, context) -> scores`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from synood_jax.data import datasets as data, imagenet as imagenet_classes
from synood_jax.ood import metrics, report
from synood_jax.progress import Progress

ScoreFn = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]


# ------------------------------------------------------------------------------------------------
# Sets from the config.

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
      bad = [data.Failure(-1, p, "missing") for p in data.missing_files(ds)]
    else:
      bad = data.check_readable(ds, decode=verify == "decode", num_threads=num_threads)
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


# ------------------------------------------------------------------------------------------------
# Model-side adapters (zero_shot, clip_preprocess live in their own modules).

def make_preprocess(clip_path: str, image_size: int) -> tuple[Callable, str]:
  """(PIL image -> float32 HWC, an id string of the preprocessing for cache keys), from the model
  folder's preprocessor_config.json (CLIPImageProcessor's defaults without one)."""
  from synood_jax.models import clip_preprocess
  cfg = clip_preprocess.load_config(clip_path)
  if cfg.do_center_crop and (cfg.crop_height, cfg.crop_width) != (image_size, image_size):
    raise ValueError(f"{clip_path}: preprocessing crops {cfg.crop_height}x{cfg.crop_width}, the model takes "
                     f"{image_size}x{image_size}")
  return functools.partial(clip_preprocess.preprocess_image, config=cfg), json.dumps(
      dataclasses.asdict(cfg), sort_keys=True)


def encode_prompts(bundle, params, prompts: Sequence[str], batch_size: int, mesh=None) -> np.ndarray:
  """L2-normalised features [N, D] of exact prompts (one template '{}', so no ensembling)."""
  from synood_jax.models import zero_shot
  return np.asarray(zero_shot.class_text_features(bundle, params, list(prompts), ["{}"], batch_size,
                                                  mesh=mesh), np.float32)


def class_features(bundle, params, classnames, templates, batch_size: int, mesh=None) -> np.ndarray:
  from synood_jax.models import zero_shot
  return np.asarray(zero_shot.class_text_features(bundle, params, list(classnames), list(templates),
                                                  batch_size, mesh=mesh), np.float32)


def _image_batch_features(bundle, params, images: np.ndarray, batch_size: int, mesh=None) -> np.ndarray:
  from synood_jax.models import zero_shot
  return np.asarray(zero_shot.image_features(bundle, params, images, batch_size, mesh=mesh, normalize=False),
                    np.float32)


# ------------------------------------------------------------------------------------------------
# Feature extraction with an on-disk cache.

@dataclasses.dataclass
class Features:
  features: np.ndarray        # float32 [n, D], raw projected embeddings (not normalised: SynOOD's
                              # projection takes them as they are), rows for the readable records
  labels: np.ndarray          # int64 [n]
  indices: np.ndarray         # int64 [n]: record index of each row
  failures: list[dict]        # [{path, error}] records that could not be read (left out)
  cache_path: str = ""


def model_fingerprint(clip_path: str) -> str:
  """The model folder (absolute) plus size and mtime of its config and weight files."""
  path = os.path.abspath(clip_path)
  h = hashlib.sha256(path.encode())
  if os.path.isdir(path):
    for f in sorted(os.listdir(path)):
      if f.endswith((".json", ".safetensors", ".bin", ".msgpack", ".npz", ".pth", ".pt")):
        st = os.stat(os.path.join(path, f))
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()


def cache_key(dataset: data.Dataset, model_fp: str, preprocess_id: str, dtype: str) -> str:
  key = json.dumps({"set": dataset.fingerprint(), "model": model_fp, "preprocess": preprocess_id,
                    "dtype": dtype, "features": "raw"}, sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()


def load_cached(path: str) -> Features | None:
  if not os.path.isfile(path):
    return None
  with np.load(path, allow_pickle=False) as z:
    failures = json.loads(str(z["failures"]))
    return Features(z["features"], z["labels"], z["indices"], failures, path)


def extract_features(bundle, params, dataset: data.Dataset, preprocess: Callable, *, batch_size: int,
                     mesh=None, cache_path: str | None = None, num_threads: int | None = None) -> Features:
  """Image features of every readable record, batch by batch (each padded to `batch_size` rows, so
  one compiled shape); unreadable records are listed in `failures` (and logged), never dropped silently."""
  if cache_path:
    cached = load_cached(cache_path)
    if cached is not None:
      logging.info("%s: features from cache %s", dataset.name, cache_path)
      return cached
  loader = data.ImageLoader(dataset, batch_size, preprocess, num_threads=num_threads)
  feats, labels, indices = [], [], []
  start, done = time.perf_counter(), 0
  progress = Progress(len(dataset), name=f"features {dataset.name}", unit="img", every_secs=10)
  for batch in loader:
    images = batch["image"]
    n = images.shape[0]
    if n < batch_size:  # pad with the last image: same compiled shape for every batch
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    f = _image_batch_features(bundle, params, images, batch_size, mesh)[:n]
    feats.append(f)
    labels.append(batch["label"])
    indices.append(batch["index"])
    if done == 0:
      progress.restart(done=n)  # the first batch compiled: the pace counts from its end
    else:
      progress.update(n)
    done += n
  if not feats:
    raise data.DataError(f"{dataset.name}: no readable image among {len(dataset)} records")
  logging.info("%s: %d images encoded in %.1f s (%d unreadable)", dataset.name, done,
               time.perf_counter() - start, len(loader.failures))
  out = Features(np.concatenate(feats).astype(np.float32), np.concatenate(labels), np.concatenate(indices),
                 [{"path": f.path, "error": f.error} for f in loader.failures], cache_path or "")
  if cache_path:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, features=out.features, labels=out.labels, indices=out.indices,
             failures=np.asarray(json.dumps(out.failures)), name=np.asarray(dataset.name))
    os.replace(tmp, cache_path)
  return out


# ------------------------------------------------------------------------------------------------
# Scores.

def _chunked(fn: Callable[[np.ndarray], Any], x: np.ndarray, chunk: int) -> np.ndarray:
  """fn over rows in fixed-size chunks (the last one padded), so each score compiles once."""
  out = []
  for i in range(0, x.shape[0], chunk):
    part = x[i:i + chunk]
    n = part.shape[0]
    if n < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
    out.append(np.asarray(fn(part))[:n])
  return np.concatenate(out).astype(np.float64)


def builtin_methods(names: Sequence[str], *, groups: int, temperature: float, seed: int,
                    mcm_temperature: float) -> dict[str, ScoreFn]:
  from synood_jax.ood import scores
  from synood_jax.models.zero_shot import l2_normalize as unit
  table = {  # features arrive raw (as cached); the zero-shot scores take them normalised
      "mcm": lambda img, ctx: scores.mcm_score(unit(img), ctx["id_text"], temperature=mcm_temperature),
      "neglabel": lambda img, ctx: scores.neglabel_score(
          unit(img), ctx["id_text"], ctx["neg_text"], groups=groups, temperature=temperature, seed=seed),
  }
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown score(s) {unknown}; built in: {sorted(table)} (others via extra_methods)")
  return {n: table[n] for n in names}


def tuned_method(*, groups: int, temperature: float, seed: int,
                 image_transform: Callable | None, negative_features: np.ndarray | None) -> ScoreFn:
  """NegLabel's score on transformed raw image features against (tuned) negative features."""
  from synood_jax.ood import scores
  from synood_jax.models import zero_shot

  def fn(img, ctx):
    x = zero_shot.l2_normalize(img) if image_transform is None else image_transform(img)
    neg = ctx["neg_text"] if negative_features is None else negative_features
    return scores.neglabel_score(x, ctx["id_text"], neg, groups=groups, temperature=temperature, seed=seed)
  return fn


def compute_metrics(scores: Mapping[str, Mapping[str, np.ndarray]], id_set: str, ood_sets: Sequence[str],
                    conventions: Sequence[str] = metrics.CONVENTIONS) -> dict:
  """{method: {convention: {ood_set: metrics, 'average': mean over sets}}}."""
  out = {}
  for method, by_set in scores.items():
    out[method] = {}
    for conv in conventions:
      per = {s: metrics.ood_metrics(by_set[id_set], by_set[s], conv) for s in ood_sets}
      per["average"] = {k: float(np.mean([per[s][k] for s in ood_sets])) for k in per[ood_sets[0]]}
      out[method][conv] = per
  return out


# ------------------------------------------------------------------------------------------------
# Negative labels.

def negative_text(config, bundle, params, classnames, id_template: str, mesh, workdir: str):
  """(features [M, D], labels, description) from config.negatives: a label list or a mining corpus."""
  from synood_jax.labels import negative_labels as nl
  neg = config.negatives
  batch = int(config.text_batch_size)
  if neg.get("label_list"):
    labels = nl.load_label_list(neg.label_list)
    desc = f"{len(labels)} from `{neg.label_list}`"
  elif neg.get("corpus"):
    corpus = neg.corpus
    if "," in corpus:
      nouns, adjs = nl.read_word_lists(*[c.strip() for c in corpus.split(",", 1)])
    else:
      nouns, adjs = nl.read_wordnet(corpus)
    labels = nl.mine_negative_labels(
        lambda prompts: encode_prompts(bundle, params, prompts, batch, mesh), classnames, nouns, adjs,
        percentile=float(neg.get("percentile", 0.95)), keep_fraction=float(neg.get("keep_fraction", 0.15)),
        id_template=id_template)
    path = os.path.join(workdir, "negative_labels.json")
    nl.write_label_list(path, labels, {"corpus": corpus, "model": config.clip_path,
                                       "nouns": len(nouns), "adjectives": len(adjs)})
    desc = f"{len(labels)} mined from `{corpus}` ({len(nouns)} nouns, {len(adjs)} adjectives), saved to {path}"
  else:
    return None, [], "none"
  feats = encode_prompts(bundle, params, labels.prompts, batch, mesh)
  return feats, list(labels.labels), desc


# ------------------------------------------------------------------------------------------------
# The whole evaluation.

def evaluate(config, workdir: str, *, bundle=None, image_transform: Callable | None = None,
             negative_features: np.ndarray | None = None,
             extra_methods: Mapping[str, ScoreFn] | None = None) -> dict:
  """Run the evaluation the config describes; write results.json / results.md / plots to workdir."""
  import jax
  import jax.numpy as jnp

  from synood_jax import parallel
  from synood_jax.models import clip

  if jax.process_count() > 1:
    raise NotImplementedError("evaluate: multi-host feature extraction is not implemented (one host only)")
  os.makedirs(workdir, exist_ok=True)
  id_sets = parse_sets(config.id_set, config.get("data_dir", ""))
  if len(id_sets) != 1:
    raise ValueError(f"config.id_set: exactly one ID set, got {list(id_sets)}")
  ood_sets = parse_sets(config.ood_sets, config.get("data_dir", ""))
  if not ood_sets:
    raise ValueError("config.ood_sets is empty")
  id_name = next(iter(id_sets))
  sets = load_sets(id_sets, ood_sets, allow_partial=bool(config.get("allow_partial", False)),
                   verify=config.get("verify", "exists"), num_threads=config.get("num_threads") or None)

  classnames = imagenet_classes.load_classnames(config.classnames)
  templates = imagenet_classes.load_templates(config.templates)
  dtype = config.get("dtype", "float32")
  if bundle is None:
    bundle = clip.from_pretrained(config.clip_path, dtype=jnp.dtype(dtype))
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  params = parallel.shard_params(bundle.params, mesh)
  batch_size = int(config.batch_size)
  multiple = parallel.batch_size_multiple(mesh)
  if batch_size % multiple:
    batch_size += multiple - batch_size % multiple
    logging.info("batch size rounded up to %d (a multiple of the %d devices)", batch_size, multiple)

  id_text = class_features(bundle, params, classnames, templates, int(config.text_batch_size), mesh)
  neg_text, neg_labels, neg_desc = negative_text(config, bundle, params, classnames, templates[0], mesh, workdir)

  image_size = bundle.config.vision.image_size
  preprocess, preprocess_id = make_preprocess(config.clip_path, image_size)
  cache_dir = config.get("cache_dir") or os.path.join(workdir, "cache")
  model_fp = model_fingerprint(config.clip_path)
  feats = {}
  for name, ds in sets.items():
    key = cache_key(ds, model_fp, preprocess_id, dtype)
    feats[name] = extract_features(bundle, params, ds, preprocess, batch_size=batch_size, mesh=mesh,
                                   cache_path=os.path.join(cache_dir, f"{name}-{key[:24]}.npz"),
                                   num_threads=config.get("num_threads") or None)

  methods = [m.strip() for m in config.scores.split(",")] if isinstance(config.scores, str) else list(config.scores)
  if neg_text is None and "neglabel" in methods:
    raise ValueError("score 'neglabel' needs config.negatives.label_list or config.negatives.corpus")
  kw = dict(groups=int(config.groups), temperature=float(config.temperature), seed=int(config.seed))
  fns = builtin_methods(methods, mcm_temperature=float(config.mcm_temperature), **kw)
  if image_transform is not None or negative_features is not None:
    fns[config.get("tuned_method", "synood")] = tuned_method(
        image_transform=image_transform,
        negative_features=None if negative_features is None else np.asarray(negative_features, np.float32),
        **kw)
  fns.update(extra_methods or {})
  ctx = {"id_text": jnp.asarray(id_text), "neg_text": None if neg_text is None else jnp.asarray(neg_text),
         "classnames": classnames, "negative_labels": neg_labels}
  chunk = int(config.get("score_batch_size", 4096))
  all_scores = {m: {name: _chunked(lambda x, fn=fn: fn(jnp.asarray(x), ctx), f.features, chunk)
                    for name, f in feats.items()} for m, fn in fns.items()}

  ood_names = list(ood_sets)
  conventions = list(metrics.CONVENTIONS)
  results = {
      "header": {
          "model": os.path.abspath(config.clip_path), "dtype": dtype,
          "classnames": _describe_classnames(config.classnames),
          "num_classes": len(classnames), "templates": templates, "negatives": neg_desc,
          "num_negatives": 0 if neg_text is None else int(neg_text.shape[0]),
          "groups": kw["groups"], "temperature": kw["temperature"], "seed": kw["seed"],
          "mcm_temperature": float(config.mcm_temperature), "preprocess": preprocess_id,
          "id_set": id_name, "id_count": int(feats[id_name].features.shape[0]),
          "ood_counts": {s: int(feats[s].features.shape[0]) for s in ood_names},
          "mesh": dict(mesh.shape), "batch_size": batch_size,
      },
      "id_set": id_name, "ood_sets": ood_names, "conventions": conventions,
      "methods": compute_metrics(all_scores, id_name, ood_names, conventions),
      "id_accuracy": _id_accuracy(feats[id_name], id_text),
      "failures": {name: f.failures for name, f in feats.items()},
      "cache": {name: f.cache_path for name, f in feats.items()},
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  report.write_markdown(results, os.path.join(workdir, "results.md"))
  np.savez(os.path.join(workdir, "scores.npz"),
           **{f"{m}/{s}": v for m, by_set in all_scores.items() for s, v in by_set.items()})
  np.savez(os.path.join(workdir, "text_features.npz"), id_text=id_text,
           neg_text=np.zeros((0, id_text.shape[1]), np.float32) if neg_text is None else neg_text)
  if config.get("plots", True):
    report.write_plots(all_scores, id_name, ood_names, os.path.join(workdir, "plots"))
  logging.info("results:\n%s", report.metrics_table(results, "id_positive"))
  return results


def _describe_classnames(source) -> str:
  if not isinstance(source, str):
    return "(a list given in the config)"
  if source.lower() in imagenet_classes.BUILTIN:
    return (f"builtin '{source}': CLIP's cleaned ImageNet-1k names "
            "(openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb), as MCM / NegLabel use")
  return f"`{os.path.abspath(source)}`"


def _id_accuracy(f: Features, id_text: np.ndarray) -> float | None:
  """Zero-shot top-1 on the ID set when its labels index the class names (else None)."""
  if f.labels.size == 0 or f.labels.min() < 0 or f.labels.max() >= id_text.shape[0]:
    return None
  pred = np.argmax(f.features @ id_text.T, axis=1)
  return float(np.mean(pred == f.labels))
