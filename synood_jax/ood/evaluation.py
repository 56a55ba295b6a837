"""OOD evaluation: image features once (cached), each method's scores, metrics in both conventions.

  S_MCM(x) = max_c softmax(cos(f(x), t_c) / T_MCM)                                  t_c: 'a photo of a {}'
  S_NegLabel(x) = 1/G sum_g sum_{c in ID} softmax([cos_ID, cos_{N_g}] / T)_c      t_c: 'the nice {}'
  FPR95 at the operating point of `metrics` (defaults: NegLabel's rule with ID positive, OpenOOD v1.5's
  with OOD positive); AUROC, AUPR-In, AUPR-Out.

The API takes explicit arguments, so any CLIP and any extra score (a tuned model's) can be evaluated:

  sets = load_sets({'imagenet_val': spec}, {'sun': spec, ...})   # every file checked before model work
  negatives = encode_negatives(clip, classnames, label_list='neglabel_10499.txt')
  results = evaluate(workdir, sets, 'imagenet_val', clip=clip, classnames=classnames,
                     negatives=negatives, methods={'synood': tuned.score_features})

`evaluate`:
  1. encodes the ID class prompts with each method's templates (MCM's and NegLabel's own), unless
     `id_text` gives them;
  2. extracts raw image features once per set, sharded over the mesh and cached on disk as npz keyed
     by (set fingerprint, model folder and its weights, preprocessing, dtype), unless a set is given
     as precomputed `Features`;
  3. scores every set with each method and computes the metrics per OOD set and their average in
     both conventions (ID positive as MOS/MCM/NegLabel; OOD positive as OpenOOD v1.5);
  4. writes results.json, results.md (Table 1 layout), scores.npz, text_features.npz and PNG plots.
`evaluate_config(config, workdir)` is the one adapter from a config (configs/evaluate.py) to these
arguments; the pipeline's evaluation stage passes its own models, negatives and tuned model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from synood_jax import fileio, runtime
from synood_jax.data import datasets as data, imagenet as imagenet_classes
from synood_jax.ood import metrics, report
from synood_jax.progress import Progress

ScoreFn = Callable[[Any], Any]  # raw image features [n, D] -> scores [n], higher = more ID
BUILTIN_SCORES = ("mcm", "neglabel")


# ------------------------------------------------------------------------------------------------
# Sets.

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
  if not fileio.exists(path):
    return None
  with fileio.open_file(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
    failures = json.loads(str(z["failures"]))
    return Features(z["features"], z["labels"], z["indices"], failures, path)


def save_cached(path: str, out: Features, name: str) -> None:
  """Process 0 writes the cache (every process holds the same gathered features)."""
  fileio.atomic_write(path, lambda f: np.savez(
      f, features=out.features, labels=out.labels, indices=out.indices,
      failures=np.asarray(json.dumps(out.failures)), name=np.asarray(name)))


def extract_features(bundle, params, dataset: data.Dataset, preprocess: Callable, *, batch_size: int,
                     mesh=None, cache_path: str | None = None, num_threads: int | None = None) -> Features:
  """Image features of every readable record (`encode_process_slices`); unreadable records are listed
  in `failures` (and logged), never dropped silently. With `cache_path`: read from there if process 0
  finds it (then every process reads it: one decision for all), else written there by process 0."""
  if cache_path and runtime.agreed(fileio.exists(cache_path)):
    logging.info("%s: features from cache %s", dataset.name, cache_path)
    return load_cached(cache_path)
  out = encode_process_slices(bundle, params, dataset, preprocess, batch_size=batch_size, mesh=mesh,
                              num_threads=num_threads)
  if cache_path:
    out.cache_path = cache_path
    if fileio.is_writer():
      save_cached(cache_path, out, dataset.name)
  return out


def process_records(num_records: int, batch_size: int) -> np.ndarray:
  """The record indices this process reads: its rows (`parallel.process_rows`) of every global batch
  of `batch_size` records."""
  from synood_jax import parallel
  rows = parallel.process_rows(batch_size)
  idx = (np.arange(0, num_records, batch_size)[:, None] + np.arange(rows.start, rows.stop)[None, :]).reshape(-1)
  return idx[idx < num_records]


def encode_process_slices(bundle, params, dataset: data.Dataset, preprocess: Callable, *, batch_size: int,
                          mesh=None, num_threads: int | None = None) -> Features:
  """Raw image features of a set, each process reading and encoding only its own slice.

  Global batch k holds records [k B, (k + 1) B); process p loads rows [p B/P, (p + 1) B/P) of it,
  the batch is encoded over the whole mesh, and p keeps its rows' features. Unreadable or missing
  rows are zeros marked invalid (one compiled shape, no row depends on another). One all-gather at the
  end gives every process all rows, in record order: the same result as one process with B rows.
  """
  import jax

  from synood_jax import parallel
  from synood_jax.models import zero_shot

  mesh = parallel.make_mesh() if mesh is None else mesh
  multiple = parallel.batch_size_multiple(mesh)
  batch_size = -(-batch_size // multiple) * multiple  # every device gets equal rows
  local, n_batches = batch_size // jax.process_count(), -(-len(dataset) // batch_size)
  mine = process_records(len(dataset), batch_size)
  loader = data.ImageLoader(dataclasses.replace(dataset, records=[dataset.records[i] for i in mine]), local,
                            preprocess, num_threads=num_threads)
  size = bundle.config.vision.image_size
  feats = np.zeros((n_batches, local, bundle.config.projection_dim), np.float32)
  valid = np.zeros((n_batches, local), bool)
  start = time.perf_counter()
  progress = Progress(len(mine), name=f"features {dataset.name}", unit="img", every_secs=10)
  batches = iter(loader)
  batch = next(batches, None)
  for k in range(n_batches):  # the loader skips batches with no readable image: match by index
    images = np.zeros((local, size, size, 3), np.float32)
    if batch is not None and batch["index"][0] // local == k:
      rows = batch["index"] - k * local
      images[rows], valid[k, rows] = batch["image"], True
      batch = next(batches, None)
    out = zero_shot.encode_global_batch(bundle, params, parallel.global_batch(images, mesh), mesh, normalize=False)
    feats[k] = parallel.host_rows(out, mesh)
    n = min(local, len(mine) - k * local)
    if k == 0:
      progress.restart(done=n)  # the first batch compiled: the pace counts from its end
    else:
      progress.update(n)
  failures = [dict(index=int(mine[f.index]), path=f.path, error=f.error) for f in loader.failures]
  feats, valid = _gather_in_record_order(feats, valid)
  failures = sorted(sum(runtime.gather_json(failures), []), key=lambda f: f["index"])
  indices = np.flatnonzero(valid[:len(dataset)])
  if not indices.size:
    raise data.DataError(f"{dataset.name}: no readable image among {len(dataset)} records")
  logging.info("%s: %d images encoded in %.1f s over %d process(es) (%d unreadable)", dataset.name, indices.size,
               time.perf_counter() - start, jax.process_count(), len(failures))
  return Features(feats[indices], dataset.labels[indices], indices.astype(np.int64),
                  [{"path": f["path"], "error": f["error"]} for f in failures])


def _gather_in_record_order(feats: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[n_batches, local, ...] per process -> [n_batches * B, ...] of all processes, row = record index."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:  # [P, n_batches, local, ...] -> batch-major, then process, then row
    feats, valid = (np.swapaxes(np.asarray(multihost_utils.process_allgather(x)), 0, 1) for x in (feats, valid))
  return feats.reshape(-1, feats.shape[-1]), valid.reshape(-1)


def _model_folder(bundle) -> str:
  """The CLIP's folder: its preprocessor_config.json, and its weights for the cache key."""
  if not bundle.folder:
    raise ValueError("evaluation: the CLIP bundle has no folder (load it with clip.from_pretrained): "
                     "its preprocessing and the feature cache key come from there")
  return bundle.folder


def _dtype_name(bundle) -> str:
  return np.dtype(bundle.module.dtype).name


def encode_set(bundle, dataset: data.Dataset, *, params=None, batch_size: int = 256, mesh=None,
               cache_dir: str = "", num_threads: int | None = None) -> Features:
  """Raw image embeddings of a set's readable images (`extract_features`), preprocessed as the model
  folder says; cached under `cache_dir` (if given) by (set, model weights, preprocessing, dtype)."""
  from synood_jax import parallel
  folder = _model_folder(bundle)
  preprocess, preprocess_id = make_preprocess(folder, bundle.config.vision.image_size)
  if mesh is not None:  # every device gets equal rows
    multiple = parallel.batch_size_multiple(mesh)
    batch_size = -(-batch_size // multiple) * multiple
  cache_path = None
  if cache_dir:
    key = cache_key(dataset, model_fingerprint(folder), preprocess_id, _dtype_name(bundle))
    cache_path = os.path.join(cache_dir, f"{dataset.name}-{key[:24]}.npz")
  return extract_features(bundle, bundle.params if params is None else params, dataset, preprocess,
                          batch_size=batch_size, mesh=mesh, cache_path=cache_path, num_threads=num_threads)


# ------------------------------------------------------------------------------------------------
# NegLabel's negative labels, encoded once per run.

@dataclasses.dataclass(frozen=True)
class Negatives:
  """Negative labels (words, prompts, provenance) with their L2-normalised text features [M, D]."""
  labels: Any                 # labels.negative_labels.NegativeLabels
  features: np.ndarray        # float32 [M, D]
  provenance: dict            # where the labels came from (`negative_labels.load_or_mine`)

  @property
  def description(self) -> str:
    p, n = self.provenance, len(self.labels)
    if p.get("label_list"):
      return f"{n} from `{p['label_list']}`"
    if p.get("corpus"):
      return f"{n} mined from `{p['corpus']}` ({p.get('nouns')} nouns, {p.get('adjectives')} adjectives)"
    return f"{n} given by the caller"

  def save(self, label_list_path: str, features_path: str) -> None:
    """The label list (JSON, with provenance) and the features (npz with the prompts they encode)."""
    from synood_jax.labels import negative_labels as nl
    nl.write_label_list(label_list_path, self.labels, self.provenance)
    fileio.atomic_write(features_path, lambda f: np.savez(f, features=self.features,
                                                          prompts=np.asarray(self.labels.prompts)))

  @classmethod
  def load(cls, label_list_path: str, features_path: str) -> "Negatives":
    from synood_jax.labels import negative_labels as nl
    labels = nl.load_label_list(label_list_path)
    provenance = fileio.read_json(label_list_path).get("provenance", {})
    with fileio.open_file(features_path) as f, np.load(io.BytesIO(f.read())) as z:
      features, prompts = z["features"], [str(p) for p in z["prompts"]]
    if prompts != list(labels.prompts):
      raise ValueError(f"{features_path}: features of {len(prompts)} prompts, not of the "
                       f"{len(labels)} in {label_list_path}")
    return cls(labels, features, provenance)


def encode_negatives(bundle, classnames: Sequence[str], *, params=None, label_list: str = "",
                     corpus: str = "", percentile: float = 0.95, keep_fraction: float = 0.15,
                     batch_size: int = 1000, mesh=None) -> Negatives | None:
  """NegLabel's negatives (`negative_labels.load_or_mine`: a list, or mined from a corpus) and their
  features, each prompt encoded once; None when neither a list nor a corpus is given."""
  from synood_jax.labels import negative_labels as nl
  params = bundle.params if params is None else params
  encode = lambda prompts: encode_prompts(bundle, params, prompts, batch_size, mesh)
  found = nl.load_or_mine(encode, classnames, label_list=label_list, corpus=corpus, percentile=percentile,
                          keep_fraction=keep_fraction)
  if found is None:
    return None
  labels, provenance = found
  provenance = {**provenance, "model": bundle.folder}
  return Negatives(labels, encode(labels.prompts), provenance)


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


@dataclasses.dataclass(frozen=True)
class Options:
  """How `evaluate` scores and reports; the fields are configs/evaluate.py's `eval.*` of the same name."""
  scores: Sequence[str] = BUILTIN_SCORES
  templates: Mapping[str, Any] = dataclasses.field(  # method -> template name, template, or list
      default_factory=lambda: {"mcm": "mcm", "neglabel": "neglabel"})
  groups: int = 100                 # NegLabel
  temperature: float = 0.01
  seed: int = 0                     # NegLabel's grouping permutation
  mcm_temperature: float = 1.0
  fpr95_rules: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(metrics.DEFAULT_FPR_RULES))
  batch_size: int = 256             # images per step (rounded up to a multiple of the devices)
  text_batch_size: int = 1000
  score_batch_size: int = 4096
  num_threads: int = 0              # image decoding (0: the loader's default)
  cache_dir: str = ""               # '' = <workdir>/cache
  plots: bool = True

  def __post_init__(self):
    unknown = [m for m in self.scores if m not in BUILTIN_SCORES]
    if unknown:
      raise ValueError(f"eval.scores: unknown {unknown}; built in: {BUILTIN_SCORES} (others via `methods`)")
    missing = [m for m in self.scores if m not in self.templates]
    if missing:
      raise ValueError(f"eval.templates: no templates for {missing}")
    for conv, rule in self.fpr95_rules.items():
      if conv not in metrics.CONVENTIONS or rule not in metrics.FPR_RULES:
        raise ValueError(f"eval.fpr95_rules: {conv}={rule!r}; conventions {metrics.CONVENTIONS}, "
                         f"rules {metrics.FPR_RULES}")

  @classmethod
  def from_config(cls, e) -> "Options":
    """From a config's `eval` (configs/evaluate.py)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in e.items() if k in fields}
    if isinstance(kw.get("scores"), str):
      kw["scores"] = tuple(m.strip() for m in kw["scores"].split(",") if m.strip())
    return cls(**kw)


def builtin_methods(names: Sequence[str], id_text: Mapping[str, Any], neg_text, *, groups: int,
                    temperature: float, seed: int, mcm_temperature: float) -> dict[str, ScoreFn]:
  """MCM and NegLabel on raw image features (normalised here), each with its own ID text."""
  from synood_jax.ood import scores
  from synood_jax.models.zero_shot import l2_normalize as unit
  table = {
      "mcm": lambda img: scores.mcm_score(unit(img), id_text["mcm"], temperature=mcm_temperature),
      "neglabel": lambda img: scores.neglabel_score(unit(img), id_text["neglabel"], neg_text, groups=groups,
                                                    temperature=temperature, seed=seed),
  }
  return {n: table[n] for n in names}


def compute_metrics(scores: Mapping[str, Mapping[str, np.ndarray]], id_set: str, ood_sets: Sequence[str],
                    rules: Mapping[str, str] | None = None) -> dict:
  """{method: {convention: {ood_set: metrics, 'average': mean over sets}}}; `rules`: convention ->
  FPR95 rule (default `metrics.DEFAULT_FPR_RULES`). Empty or non-finite scores: an error naming both."""
  rules = dict(metrics.DEFAULT_FPR_RULES if rules is None else rules)
  out = {}
  for method, by_set in scores.items():
    checked = {s: metrics.check_scores(by_set[s], f"method {method!r}, set {s!r}") for s in [id_set, *ood_sets]}
    out[method] = {}
    for conv, rule in rules.items():
      per = {s: metrics.ood_metrics(checked[id_set], checked[s], conv, rule=rule) for s in ood_sets}
      per["average"] = {k: float(np.mean([per[s][k] for s in ood_sets])) for k in per[ood_sets[0]]}
      out[method][conv] = per
  return out


# ------------------------------------------------------------------------------------------------
# The whole evaluation.

def evaluate(workdir: str, sets: Mapping[str, data.Dataset | Features], id_set: str, *, clip=None,
             params=None, classnames: str | Sequence[str] | None = None, negatives: Negatives | None = None,
             mesh=None, options: Options | None = None, id_text: Mapping[str, np.ndarray] | None = None,
             methods: Mapping[str, ScoreFn] | None = None,
             method_templates: Mapping[str, Sequence[str]] | None = None) -> dict:
  """Score `sets` with each method; write results.json / results.md / scores / plots to `workdir`.

  sets: name -> a Dataset (encoded with `clip`, cached) or precomputed raw image `Features`;
    `id_set` names the ID one, the others are OOD (in order).
  clip, params: a CLIP bundle (`models.clip.from_pretrained`) and its params (default: the bundle's;
    pass them sharded for FSDP); encodes the images and the ID class prompts.
  classnames: the ID classes in label order (a list, a file or a builtin name such as 'imagenet').
  negatives: NegLabel's encoded negatives (`encode_negatives`), needed by the 'neglabel' score.
  id_text: {method: [C, D]} ID class features to use instead of encoding the method's templates.
  methods: more scores by name, fn(raw image features [n, D]) -> [n], e.g. a tuned model's
    `score_features`; `method_templates` states their ID prompts in the results header.
  """
  import jax.numpy as jnp

  from synood_jax import parallel

  options = Options() if options is None else options
  if id_set not in sets or len(sets) < 2:
    raise ValueError(f"evaluate: id_set {id_set!r} must be one of the sets {list(sets)}, with at least one other")
  ood_names = [s for s in sets if s != id_set]
  if fileio.is_writer():
    fileio.makedirs(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh

  names = imagenet_classes.load_classnames(classnames) if classnames is not None else None
  templates = {m: imagenet_classes.load_templates(options.templates[m]) for m in options.scores}
  texts = _id_text(clip, params, names, templates, dict(id_text or {}), options.text_batch_size, mesh)
  if "neglabel" in options.scores and negatives is None:
    raise ValueError("evaluate: score 'neglabel' needs `negatives` (config.negatives.label_list or .corpus)")
  neg_text = None if negatives is None else jnp.asarray(negatives.features, jnp.float32)

  feats = {}
  for name, s in sets.items():
    if isinstance(s, Features):
      feats[name] = s
      continue
    if clip is None:
      raise ValueError(f"evaluate: set {name!r} is a Dataset: encoding it needs `clip`")
    feats[name] = encode_set(clip, s, params=params, batch_size=options.batch_size, mesh=mesh,
                             cache_dir=options.cache_dir or os.path.join(workdir, "cache"),
                             num_threads=options.num_threads or None)

  fns = builtin_methods(options.scores, {m: jnp.asarray(t) for m, t in texts.items()}, neg_text,
                        groups=options.groups, temperature=options.temperature, seed=options.seed,
                        mcm_temperature=options.mcm_temperature)
  clash = set(fns) & set(methods or {})
  if clash:
    raise ValueError(f"evaluate: methods {sorted(clash)} are built-in scores too")
  fns.update(methods or {})
  if not fns:
    raise ValueError("evaluate: no score to compute (options.scores and methods are both empty)")
  all_scores = {m: {name: _chunked(lambda x, fn=fn: fn(jnp.asarray(x)), f.features, options.score_batch_size)
                    for name, f in feats.items()} for m, fn in fns.items()}

  id_feats = _in_label_space(sets[id_set], feats[id_set], classnames)
  results = {
      "header": _header(clip, classnames, names, templates, method_templates, negatives, options, feats,
                        id_set, ood_names, mesh),
      "id_set": id_set, "ood_sets": ood_names, "conventions": list(options.fpr95_rules),
      "counts": set_counts(sets, feats),
      "methods": compute_metrics(all_scores, id_set, ood_names, options.fpr95_rules),
      "id_accuracy": {m: _id_accuracy(id_feats, t) for m, t in texts.items()},
      "failures": {name: f.failures for name, f in feats.items()},
      "cache": {name: f.cache_path for name, f in feats.items()},
  }
  if fileio.is_writer():  # every process holds the same gathered scores; process 0 writes them
    _write_results(workdir, results, all_scores, {
        **{f"id_text/{m}": t for m, t in texts.items()},
        "neg_text": np.zeros((0, 0), np.float32) if negatives is None else negatives.features}, options.plots)
  logging.info("results:\n%s", report.metrics_table(results, results["conventions"][0]))
  return results


def _write_results(workdir: str, results: dict, all_scores: Mapping, text: Mapping[str, np.ndarray],
                   plots: bool) -> None:
  """results.json, results.md, scores.npz, text_features.npz and the plots (process 0)."""
  fileio.write_json(os.path.join(workdir, "results.json"), results)
  report.write_markdown(results, os.path.join(workdir, "results.md"))
  flat = {f"{m}/{s}": v for m, by_set in all_scores.items() for s, v in by_set.items()}
  fileio.atomic_write(os.path.join(workdir, "scores.npz"), lambda f: np.savez(f, **flat))
  fileio.atomic_write(os.path.join(workdir, "text_features.npz"), lambda f: np.savez(f, **text))
  if plots:
    report.write_plots(all_scores, results["id_set"], results["ood_sets"], os.path.join(workdir, "plots"),
                       counts=results["counts"])


def _id_text(clip, params, names, templates: Mapping[str, list[str]], given: dict, batch_size: int,
             mesh) -> dict[str, np.ndarray]:
  """{method: [C, D]}: given, or encoded once per distinct template list."""
  encoded = {}
  for m, t in templates.items():
    if m in given:
      continue
    if clip is None or names is None:
      raise ValueError(f"evaluate: score {m!r} needs `id_text[{m!r}]`, or `clip` and `classnames`")
    if tuple(t) not in encoded:
      encoded[tuple(t)] = class_features(clip, clip.params if params is None else params, names, t,
                                         batch_size, mesh)
    given[m] = encoded[tuple(t)]
  return {m: np.asarray(given[m], np.float32) for m in templates}


def _header(clip, classnames, names, templates, method_templates, negatives, options: Options, feats,
            id_set: str, ood_names: list[str], mesh) -> dict:
  """What produced the numbers (results.md prints it above the tables)."""
  prompts = {m: list(t) for m, t in templates.items()}
  prompts.update({m: list(t) for m, t in (method_templates or {}).items()})
  return {
      "model": os.path.abspath(clip.folder) if clip is not None and clip.folder else "(precomputed features)",
      "dtype": _dtype_name(clip) if clip is not None else None,
      "classnames": _describe_classnames(classnames), "num_classes": None if names is None else len(names),
      "templates": prompts,
      "negatives": "none" if negatives is None else negatives.description,
      "num_negatives": 0 if negatives is None else int(negatives.features.shape[0]),
      "groups": options.groups, "temperature": options.temperature, "seed": options.seed,
      "mcm_temperature": options.mcm_temperature, "fpr95_rules": dict(options.fpr95_rules),
      "preprocess": (make_preprocess(clip.folder, clip.config.vision.image_size)[1]
                     if clip is not None and clip.folder else None),
      "id_set": id_set, "id_count": int(feats[id_set].features.shape[0]),
      "ood_counts": {s: int(feats[s].features.shape[0]) for s in ood_names},
      "mesh": dict(mesh.shape), "batch_size": options.batch_size,
  }


# ------------------------------------------------------------------------------------------------
# The config adapter (configs/evaluate.py, launch/evaluate.py).

def sets_from_config(e, id_set: str | None = None, ood_sets: str | None = None
                     ) -> tuple[dict[str, data.Dataset], str]:
  """(the loaded sets, the ID set's name) from a config's `eval` (`id_set`, `ood_sets`, `data_dir`,
  `allow_partial`, `verify`, `num_threads`); `id_set` / `ood_sets` replace the config's specs."""
  id_sets = parse_sets(e.id_set if id_set is None else id_set, e.get("data_dir", ""))
  if len(id_sets) != 1:
    raise ValueError(f"config.eval.id_set: exactly one ID set, got {list(id_sets)}")
  oods = parse_sets(e.ood_sets if ood_sets is None else ood_sets, e.get("data_dir", ""))
  if not oods:
    raise ValueError("config.eval.ood_sets is empty")
  sets = load_sets(id_sets, oods, allow_partial=bool(e.get("allow_partial", False)),
                   verify=e.get("verify", "exists"), num_threads=e.get("num_threads") or None)
  return sets, next(iter(id_sets))


def evaluate_config(config, workdir: str) -> dict:
  """The zero-shot evaluation a whole config describes (configs/evaluate.py): `models.clip_path` and
  `models.dtype`, `mesh`, `data.classnames` ('folders': the ID set's classes), `negatives.*`, `eval.*`."""
  import jax.numpy as jnp

  from synood_jax import parallel
  from synood_jax.models import clip as clip_lib

  sets, id_name = sets_from_config(config.eval)  # every file checked before any model work
  if not config.models.clip_path:
    raise ValueError("config.models.clip_path is empty: the evaluation needs a CLIP folder")
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  bundle = clip_lib.from_pretrained(config.models.clip_path, dtype=jnp.dtype(config.models.dtype),
                                    attention=config.models.get("attention", "auto"))
  params = parallel.shard_params(bundle.params, mesh, config.mesh.sharding_rules)
  classnames = config.data.classnames
  if classnames == "folders":
    classnames = sets[id_name].classes
    if not classnames:
      raise ValueError(f"config.data.classnames='folders': the ID set {id_name!r} has no class folders")
  options = Options.from_config(config.eval)
  negatives = encode_negatives(bundle, imagenet_classes.load_classnames(classnames), params=params,
                               batch_size=options.text_batch_size, mesh=mesh, **config.negatives.to_dict())
  if negatives is not None and negatives.provenance.get("corpus") and fileio.is_writer():
    negatives.save(os.path.join(workdir, "negative_labels.json"),
                   os.path.join(workdir, "negative_features.npz"))
  return evaluate(workdir, sets, id_name, clip=bundle, params=params, classnames=classnames,
                  negatives=negatives, mesh=mesh, options=options)


def _describe_classnames(source) -> str:
  if source is None:
    return "none"
  if not isinstance(source, str):
    return f"a list of {len(source)} given by the caller"
  if source.lower() in imagenet_classes.BUILTIN:
    return (f"builtin '{source}': CLIP's cleaned ImageNet-1k names "
            "(openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb), as MCM / NegLabel use")
  return f"`{os.path.abspath(source)}`"


def set_counts(sets: Mapping[str, data.Dataset | Features], feats: Mapping[str, Features]) -> dict:
  """{set: {found, listed, expected}}: images scored, records listed, images the full set has (by its
  manifest or benchmark name; None if unknown). found < expected marks a partial set everywhere."""
  from synood_jax.data import prepare
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


def _in_label_space(ds, f: Features, classnames) -> Features:
  """The ID features with labels as indices of the class names, by each class folder's name (a wnid,
  or the name itself; `imagenet.class_index`), not by its position among the set's folders: a subset
  of ImageNet val keeps ImageNet's labels. Unchanged when the set has no class folders."""
  if not isinstance(ds, data.Dataset) or not ds.classes or classnames is None or f.labels.size == 0:
    return f
  try:
    index = imagenet_classes.class_index(ds.classes, classnames).index
  except ValueError as e:
    logging.warning("%s: class folders do not match the class names (%s); no ID accuracy", ds.name, e)
    return dataclasses.replace(f, labels=np.full_like(f.labels, -1))
  lookup = np.asarray([index[c] for c in ds.classes])
  return dataclasses.replace(f, labels=np.where(f.labels >= 0, lookup[np.maximum(f.labels, 0)], -1))


def _id_accuracy(f: Features, id_text: np.ndarray) -> float | None:
  """Zero-shot top-1 on the ID set when its labels index the class names (else None)."""
  if f.labels.size == 0 or f.labels.min() < 0 or f.labels.max() >= id_text.shape[0]:
    return None
  pred = np.argmax(f.features @ id_text.T, axis=1)
  return float(np.mean(pred == f.labels))
