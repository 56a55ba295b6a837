"""The whole SynOOD method as resumable stages over one workdir.

models -> data -> sources -> synthesis -> negatives -> features -> stage2 -> stage3 -> export -> evaluate
-> report

Each stage writes into the workdir and then `done/<stage>.json`; a rerun skips finished stages, and a
stage that was killed picks up where it stopped (synthesis by its manifest, training by its orbax
checkpoints, evaluation by its feature cache).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from synood_jax.synthesis import context_prompts, guidance, sources, synthesize as synthesis
from synood_jax.data import datasets as data, imagenet as imagenet_classes
from synood_jax.demo import images as demo_data
from synood_jax.ood import evaluation
from synood_jax.pipeline import export
from synood_jax.pipeline.workdir import Workdir
from synood_jax.train import negatives, projection
from synood_jax.labels import negative_labels as nl
from synood_jax import parallel
from synood_jax.models import zero_shot

STAGES = ("models", "data", "sources", "synthesis", "negatives", "features", "stage2", "stage3",
          "export", "evaluate", "report")


# ---------------------------------------------------------------------------------------------
# Paths and shared state.

def model_paths(config, wd: Workdir) -> tuple[str, str]:
  """(CLIP folder, SD in-painting folder): the config's, or the tiny ones the models stage makes."""
  m = config.models
  return (m.clip_path or wd.demo_clip, m.sd_path or wd.demo_sd)


def data_roots(config, wd: Workdir) -> dict[str, str]:
  """Source images (ID train), plus for the demo the generated held-out sets."""
  d = config.data
  return {"train": d.train_root or wd.path("data", "train"), "val": d.get("val_root") or wd.path("data", "val"),
          "ood": wd.path("data", "ood")}


@dataclasses.dataclass
class Context:
  """Lazily loaded models shared by the stages of one run."""
  config: object
  wd: Workdir

  @functools.cached_property
  def mesh(self):
    return parallel.make_mesh(self.config.mesh.data, self.config.mesh.fsdp)

  @functools.cached_property
  def clip(self):
    from synood_jax.models import clip
    return clip.from_pretrained(model_paths(self.config, self.wd)[0],
                                dtype=jnp.dtype(self.config.models.dtype))

  @functools.cached_property
  def classnames(self) -> list[str]:
    names = self.config.data.classnames
    if names == "folders":
      return sources.class_folders(data_roots(self.config, self.wd)["train"])
    return imagenet_classes.load_classnames(names)

  @functools.cached_property
  def id_text(self) -> np.ndarray:
    """Normalised ID class text features (the NegLabel / SynOOD prompt)."""
    templates = imagenet_classes.load_templates(self.config.eval.templates)
    return zero_shot.class_text_features(self.clip, self.clip.params, self.classnames, templates,
                                         int(self.config.eval.text_batch_size), self.mesh)

  @functools.cached_property
  def synthesis_models(self):
    """(in-painting pipeline, params sharded on the mesh incl. the classifier's, logits_fn)."""
    from synood_jax.diffusion import pipeline
    c = self.config
    pipe, params = pipeline.load_inpaint_pipeline(model_paths(c, self.wd)[1], dtype=jnp.dtype(c.models.dtype),
                                                  scheduler=c.synthesis.get("scheduler") or None)
    logits_fn, params["classifier"] = _guidance(self)
    return pipe, parallel.shard_params(params, self.mesh), logits_fn

  def preprocess(self):
    return evaluation.make_preprocess(model_paths(self.config, self.wd)[0],
                                      self.clip.config.vision.image_size)[0]


def _mark_done(wd: Workdir, stage: str, info: dict) -> None:
  path = wd.done(stage)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Stages.

def stage_models(ctx: Context) -> dict:
  """The demo's tiny random models, saved in HF / diffusers format (loaded back by path later)."""
  from synood_jax.demo import tiny_clip as tiny, tiny_sd
  clip_path, sd_path = model_paths(ctx.config, ctx.wd)
  m = ctx.config.models
  made = {}
  if not m.clip_path:
    made["clip"] = tiny.make_tiny_clip(clip_path, seed=ctx.config.seed, **dict(m.get("tiny_clip", {})))
  if not m.sd_path:
    made["sd"] = tiny_sd.make_tiny_inpaint_pipeline(sd_path, seed=ctx.config.seed)
  return made


def stage_data(ctx: Context) -> dict:
  """The demo's generated images: ID classes (train / val) and held-out OOD classes, plus a word list."""
  g = ctx.config.data.get("generate")
  if not g:
    return {"generated": False}
  roots = data_roots(ctx.config, ctx.wd)
  id_classes = {name: tuple(v) for name, v in g.id_classes.items()}
  ood_classes = {name: tuple(v) for name, v in g.ood_classes.items()}
  demo_data.write_demo_images(roots["train"], id_classes, g.train_per_class, g.image_size, seed=ctx.config.seed)
  demo_data.write_demo_images(roots["val"], id_classes, g.val_per_class, g.image_size, seed=ctx.config.seed + 1)
  demo_data.write_demo_images(roots["ood"], ood_classes, g.val_per_class, g.image_size, seed=ctx.config.seed + 2)
  words = ctx.wd.words
  os.makedirs(words, exist_ok=True)
  for name, items in (("nouns.txt", g.nouns), ("adjectives.txt", g.adjectives)):
    with open(os.path.join(words, name), "w") as f:
      f.write("\n".join(items) + "\n")
  return {"generated": True, "roots": roots}


def stage_sources(ctx: Context) -> dict:
  """Per class the top-k images by JPEG bytes per pixel."""
  root = data_roots(ctx.config, ctx.wd)["train"]
  selection = sources.select_sources(root, per_class=ctx.config.sources.per_class)
  sources.write_source_list(ctx.wd.sources, selection.records)
  return {"root": root, "selected": len(selection.records),
          "skipped": [dict(path=s.path, reason=s.reason) for s in selection.skipped]}


def _records(path: str) -> list[dict]:
  return [dataclasses.asdict(r) for r in sources.read_source_list(path)]


def _guidance(ctx: Context):
  """The frozen classifier of the boundary score: CLIP zero-shot (default) or ResNet-50."""
  g = ctx.config.synthesis
  if g.classifier == "clip":
    return guidance.clip_zero_shot(ctx.clip, ctx.id_text, logit_scale=float(g.clip_logit_scale))
  if g.classifier == "resnet50":
    from synood_jax.models import resnet
    module, params = resnet.load_resnet(g.resnet_path)
    return guidance.resnet50(module, params)
  raise ValueError(f"config.synthesis.classifier: {g.classifier!r} is not 'clip' or 'resnet50'")


def _synthesize(ctx: Context, records: list[dict], source_root: str, out_dir: str) -> list[dict]:
  c = ctx.config
  contexts = c.context.answers_file or {}
  prompts = context_prompts.prompts_for_sources(
      records, contexts, policy=c.context.policy, fallback_prompt=c.context.fallback_prompt,
      template=c.context.template, max_chars=c.context.max_chars)
  kept = [r for r in records if r["path"] in prompts.prompts]
  pipe, params, logits_fn = ctx.synthesis_models
  return synthesis.synthesize(c.synthesis, out_dir, pipe, params, logits_fn, source_root, kept,
                              [prompts.prompts[r["path"]] for r in kept], ctx.mesh)


def stage_synthesis(ctx: Context) -> dict:
  """In-paint every source with boundary refinement; the demo also synthesizes from held-out ID
  images, so that the tuned model can be tested on synthetic images it never trained on."""
  root = data_roots(ctx.config, ctx.wd)
  made = _synthesize(ctx, _records(ctx.wd.sources), root["train"],
                     ctx.wd.synthesis)
  info = {"images": len(made), "flagged_in_distribution": sum(m["stayed_in_distribution"] for m in made),
          "procedure_version": synthesis.PROCEDURE_VERSION}
  if ctx.config.data.get("generate"):
    held = sources.select_sources(root["val"], per_class=10**6).records
    info["heldout_images"] = len(_synthesize(ctx, [dataclasses.asdict(r) for r in held], root["val"],
                                             ctx.wd.synthesis_heldout))
  ctx.__dict__.pop("synthesis_models", None)  # the later stages need no UNet, VAE or their params
  return info


def stage_negatives(ctx: Context) -> dict:
  """NegLabel's negative labels: a given list, or mined from a corpus with the ID class names."""
  n = ctx.config.negatives
  out = ctx.wd.negative_labels
  if n.label_list:
    labels = nl.load_label_list(n.label_list)
    provenance = {"label_list": n.label_list}
  else:
    corpus = n.corpus or ",".join(os.path.join(ctx.wd.words, f) for f in ("nouns.txt", "adjectives.txt"))
    nouns, adjs = nl.read_word_lists(*corpus.split(",", 1)) if "," in corpus else nl.read_wordnet(corpus)
    encode = lambda prompts: evaluation.encode_prompts(ctx.clip, ctx.clip.params, prompts,
                                                       int(ctx.config.eval.text_batch_size), ctx.mesh)
    labels = nl.mine_negative_labels(encode, ctx.classnames, nouns, adjs, percentile=n.percentile,
                                     keep_fraction=n.keep_fraction)
    provenance = {"corpus": corpus, "nouns": len(nouns), "adjectives": len(adjs)}
  provenance.update(model=model_paths(ctx.config, ctx.wd)[0], percentile=n.percentile,
                    keep_fraction=n.keep_fraction)
  nl.write_label_list(out, labels, provenance)
  return {"labels": len(labels), "path": out}


def _negative_text(ctx: Context) -> tuple[np.ndarray, list[str]]:
  labels = nl.load_label_list(ctx.wd.negative_labels)
  feats = evaluation.encode_prompts(ctx.clip, ctx.clip.params, labels.prompts,
                                    int(ctx.config.eval.text_batch_size), ctx.mesh)
  return feats, list(labels.labels)


def _encode_files(ctx: Context, name: str, records: list[data.Record]) -> np.ndarray:
  """Raw CLIP image embeddings of files (unreadable ones are an error here: we wrote them)."""
  ds = data.Dataset(name, records)
  f = evaluation.extract_features(ctx.clip, parallel.shard_params(ctx.clip.params, ctx.mesh), ds,
                                  ctx.preprocess(), batch_size=int(ctx.config.eval.batch_size), mesh=ctx.mesh)
  if f.failures:
    raise data.DataError(f"{name}: unreadable images {[x['path'] for x in f.failures][:5]}")
  return f.features


def stage_features(ctx: Context) -> dict:
  """Encode the training images once (the encoder is frozen) and pseudo-label the synthetic ones."""
  root = data_roots(ctx.config, ctx.wd)["train"]
  src = _records(ctx.wd.sources)
  syn_dir = ctx.wd.synthesis
  manifest = list(synthesis.read_manifest(ctx.wd.synthesis_manifest).values())
  if ctx.config.pseudo.drop_flagged:
    manifest = [m for m in manifest if not m["stayed_in_distribution"]]
  id_feats = _encode_files(ctx, "id_sources", [data.Record(os.path.join(root, r["path"]), r["class_index"]) for r in src])
  syn_feats = _encode_files(ctx, "synthetic", [data.Record(os.path.join(syn_dir, m["output"])) for m in manifest])
  neg_text, neg_names = _negative_text(ctx)
  mined = nl.pseudo_labels(zero_shot.l2_normalize(syn_feats), neg_text)
  distinct = np.unique(mined)
  used = nl.write_pseudo_labels(ctx.wd.pseudo_labels, [m["output"] for m in manifest],
                                mined, neg_names)
  np.savez(ctx.wd.features, id_features=id_feats,
           id_labels=np.asarray([r["class_index"] for r in src], np.int32), syn_features=syn_feats,
           syn_negative=mined.astype(np.int32), distinct=distinct.astype(np.int32))
  return {"id_images": len(src), "synthetic_images": len(manifest), "distinct_negative_labels": used}


def _features(ctx: Context) -> dict:
  with np.load(ctx.wd.features) as z:
    return {k: z[k] for k in z.files}


def stage_stage2(ctx: Context) -> dict:
  """Residual projection on the frozen image encoder: CE over [ID prompts; mined negatives]."""
  f = _features(ctx)
  neg_text, _ = _negative_text(ctx)
  position = {int(j): i for i, j in enumerate(f["distinct"])}  # mined label -> row among the distinct
  syn_rows = np.asarray([position[int(j)] for j in f["syn_negative"]], np.int32)
  text = np.concatenate([ctx.id_text, neg_text[f["distinct"]]])
  labels = projection.stage2_labels(f["id_labels"], syn_rows, len(ctx.classnames))
  params = projection.train_projection(ctx.config.stage2, np.concatenate([f["id_features"], f["syn_features"]]),
                                     labels, text, ctx.wd.stage2, ctx.mesh)
  path = ctx.wd.projection
  np.savez(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})
  return {"path": path, "examples": int(labels.size), "classes": int(text.shape[0])}


def stage_stage3(ctx: Context) -> dict:
  """The mined negatives' text features, trained against the synthetic images' mined labels."""
  f = _features(ctx)
  neg_text, _ = _negative_text(ctx)
  position = {int(j): i for i, j in enumerate(f["distinct"])}
  syn_rows = np.asarray([position[int(j)] for j in f["syn_negative"]], np.int32)
  tuned = negatives.train_negative_features(ctx.config.stage3, f["syn_features"], syn_rows,
                                           neg_text[f["distinct"]], ctx.wd.stage3, ctx.mesh)
  np.save(ctx.wd.tuned_negatives, tuned)
  return {"tuned_rows": int(tuned.shape[0])}


def tuned_model(ctx: Context) -> export.TunedModel:
  """The tuned model of this workdir: projection (stage 2), negatives with the tuned rows (stage 3)."""
  with np.load(ctx.wd.projection) as z:
    params = traverse_util.unflatten_dict({k: jnp.asarray(z[k]) for k in z.files}, sep="/")
  neg_text, neg_names = _negative_text(ctx)
  tuned = np.load(ctx.wd.tuned_negatives)
  negatives = neg_text.copy()
  negatives[_features(ctx)["distinct"]] = np.asarray(zero_shot.l2_normalize(tuned))
  e, s2 = ctx.config.eval, ctx.config.stage2
  return export.TunedModel(ctx.clip, params, ctx.id_text, negatives, neg_names, list(ctx.classnames),
                           groups=int(e.groups), temperature=float(e.temperature),
                           layernorm_eps=float(s2.layernorm_eps), normalize_inputs=bool(s2.normalize_inputs))


def stage_export(ctx: Context) -> dict:
  """The tuned model as a folder others can load (`export.load_tuned`)."""
  m = tuned_model(ctx)
  labels = nl.load_label_list(ctx.wd.negative_labels)
  folder = export.export_tuned(
      ctx.wd.export, m.bundle, m.projection, m.id_text, m.negatives, m.negative_labels,
      labels.prompts, m.classnames,
      {"groups": m.groups, "temperature": m.temperature, "layernorm_eps": m.layernorm_eps,
       "normalize_inputs": m.normalize_inputs, "templates": ctx.config.eval.templates,
       "clip_source": model_paths(ctx.config, ctx.wd)[0]})
  return {"folder": folder}


def stage_evaluate(ctx: Context) -> dict:
  """Zero-shot MCM / NegLabel and the tuned model (SynOOD) side by side."""
  e = ctx.config.eval.copy_and_resolve_references()
  with e.unlocked():
    e.clip_path = model_paths(ctx.config, ctx.wd)[0]
    e.negatives.label_list = ctx.wd.negative_labels
    if ctx.config.data.classnames == "folders":  # the evaluation reads names from a file
      e.classnames = ctx.wd.classnames
      with open(e.classnames, "w") as f:
        f.write("\n".join(ctx.classnames) + "\n")
    if ctx.config.data.get("generate"):
      roots = data_roots(ctx.config, ctx.wd)
      e.id_set = f"id_val={roots['val']}"
      e.ood_sets = (f"ood_classes={roots['ood']},"
                    f"synthetic_heldout={ctx.wd.synthesis_heldout}")
  tuned = tuned_model(ctx)
  evaluation.evaluate(e, ctx.wd.eval, bundle=ctx.clip, image_transform=tuned.transform,
                      negative_features=tuned.negatives)
  return {"results": ctx.wd.results}


def stage_report(ctx: Context) -> dict:
  """A Markdown report: the results table, source vs synthetic images, ROC curves."""
  from synood_jax.pipeline import report
  return {"report": report.write_run_report(ctx.wd)}


STAGE_FNS: dict[str, Callable[[Context], dict]] = {
    "models": stage_models, "data": stage_data, "sources": stage_sources, "synthesis": stage_synthesis,
    "negatives": stage_negatives, "features": stage_features, "stage2": stage_stage2,
    "stage3": stage_stage3, "export": stage_export, "evaluate": stage_evaluate, "report": stage_report,
}


def run(config, workdir: str, stages=None) -> dict:
  """Run `stages` (default: all) in order, skipping the finished ones. Returns each stage's info."""
  stages = list(STAGES if not stages else stages)
  unknown = [s for s in stages if s not in STAGE_FNS]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {STAGES}")
  wd = Workdir(workdir)
  os.makedirs(wd.root, exist_ok=True)
  ctx = Context(config, wd)
  infos = {}
  for name in stages:
    done = wd.done(name)
    if os.path.exists(done):
      logging.info("stage %s: already done (%s)", name, done)
      with open(done) as f:
        infos[name] = json.load(f)
      continue
    start = time.perf_counter()
    logging.info("stage %s: starting", name)
    info = STAGE_FNS[name](ctx) or {}
    info["seconds"] = round(time.perf_counter() - start, 2)
    _mark_done(wd, name, info)
    logging.info("stage %s: done in %.1f s", name, info["seconds"])
    infos[name] = info
  return infos
