"""OOD evaluation: image features once (cached), each method's scores, metrics in both conventions.

  S_MCM(x) = max_c softmax(cos(f(x), t_c) / T_MCM)                                  t_c: 'a photo of a {}'
  S_NegLabel(x) = 1/G sum_g sum_{c in ID} softmax([cos_ID, cos_{N_g}] / T)_c      t_c: 'the nice {}'
  FPR95 at the operating point of `metrics` (defaults: NegLabel's rule with ID positive, OpenOOD v1.5's
  with OOD positive); AUROC, AUPR-In, AUPR-Out.

The API takes explicit arguments, so any CLIP and any extra score (a tuned model's) can be evaluated:

  sets = load_sets({'imagenet_val': spec}, {'sun': spec, ...})   # ood/sets.py: files checked first
  negatives = encode_negatives(clip, classnames, label_list='neglabel_10499.txt')   # labels/encoded.py
  results = evaluate(workdir, sets, 'imagenet_val', clip=clip, classnames=classnames,
                     negatives=negatives, methods={'synood': tuned.score_features})

`evaluate`:
  1. encodes the ID class prompts with each method's templates (MCM's and NegLabel's own), unless
     `id_text` gives them;
  2. extracts raw image features once per set (ood/features.py: sharded over the mesh, cached on disk),
     unless a set is given as precomputed `Features`;
  3. scores every set with each method (the built-in ones: `ood.scores.METHODS`) and computes the metrics per OOD set and their average in
     both conventions (ID positive as MOS/MCM/NegLabel; OOD positive as OpenOOD v1.5);
  4. writes results.json, results.md (Table 1 layout), scores.npz, text_features.npz and PNG plots.
`evaluate_config(config, workdir)` is the one adapter from a config (configs/evaluate.py) to these
arguments; the pipeline's evaluation stage passes its own models, negatives and tuned model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from synood_jax import fileio, parallel
from synood_jax.data import datasets as data, imagenet as imagenet_classes
from synood_jax.labels.encoded import Negatives, encode_negatives
from synood_jax.models import clip as clip_lib, zero_shot
from synood_jax.ood import metrics, results as result_tables, scores as ood_scores
from synood_jax.ood.features import Features, dtype_name, encode_set, make_preprocess
from synood_jax.ood.sets import load_sets, parse_sets, set_counts

ScoreFn = Callable[[Any], Any]  # raw image features [n, D] -> scores [n], higher = more ID
BUILTIN_SCORES = tuple(ood_scores.METHODS)  # the registry: ood/scores.py


# ------------------------------------------------------------------------------------------------
# Options and scores.

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
  neg_text = None if negatives is None else jnp.asarray(negatives.features, jnp.float32)
  fns = {m: ood_scores.METHODS[m](jnp.asarray(texts[m]), neg_text, options) for m in options.scores}

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
      "methods": metrics.compute_metrics(all_scores, id_set, ood_names, options.fpr95_rules),
      "id_accuracy": {m: _id_accuracy(id_feats, t) for m, t in texts.items()},
      "failures": {name: f.failures for name, f in feats.items()},
      "cache": {name: f.cache_path for name, f in feats.items()},
  }
  if fileio.is_writer():  # every process holds the same gathered scores; process 0 writes them
    _write_results(workdir, results, all_scores, {
        **{f"id_text/{m}": t for m, t in texts.items()},
        "neg_text": np.zeros((0, 0), np.float32) if negatives is None else negatives.features}, options.plots)
  logging.info("results:\n%s", result_tables.metrics_table(results, results["conventions"][0]))
  return results


def _write_results(workdir: str, results: dict, all_scores: Mapping, text: Mapping[str, np.ndarray],
                   plots: bool) -> None:
  """results.json, results.md, scores.npz, text_features.npz and the plots (process 0)."""
  fileio.write_json(os.path.join(workdir, "results.json"), results)
  result_tables.write_markdown(results, os.path.join(workdir, "results.md"))
  flat = {f"{m}/{s}": v for m, by_set in all_scores.items() for s, v in by_set.items()}
  fileio.atomic_write(os.path.join(workdir, "scores.npz"), lambda f: np.savez(f, **flat))
  fileio.atomic_write(os.path.join(workdir, "text_features.npz"), lambda f: np.savez(f, **text))
  if plots:
    result_tables.write_plots(all_scores, results["id_set"], results["ood_sets"], os.path.join(workdir, "plots"),
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
      encoded[tuple(t)] = zero_shot.class_text_features(clip, clip.params if params is None else params,
                                                        names, t, batch_size, mesh)
    given[m] = encoded[tuple(t)]
  return {m: np.asarray(given[m], np.float32) for m in templates}


def _header(clip, classnames, names, templates, method_templates, negatives, options: Options, feats,
            id_set: str, ood_names: list[str], mesh) -> dict:
  """What produced the numbers (results.md prints it above the tables)."""
  prompts = {m: list(t) for m, t in templates.items()}
  prompts.update({m: list(t) for m, t in (method_templates or {}).items()})
  return {
      "model": os.path.abspath(clip.folder) if clip is not None and clip.folder else "(precomputed features)",
      "dtype": dtype_name(clip) if clip is not None else None,
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
