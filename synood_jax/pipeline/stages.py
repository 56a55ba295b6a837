"""The stages of the SynOOD method over one workdir, and the table that says what each one runs, reads,
consumes and makes (`TABLE`); `runner.py` plans and runs them, `context.py` holds what they share.

models -> data -> sources -> synthesis -> negatives -> features -> stage2 -> stage3 -> export -> evaluate
-> report

A stage is a function (RunContext) -> info dict that writes into the workdir (paths from `Workdir`).
Adding one: the function here, one `Stage(...)` line in TABLE, its paths in `Workdir`.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from synood_jax import fileio
from synood_jax.data import datasets as data
from synood_jax.demo import image_sets as demo_data
from synood_jax.labels import negative_labels as nl
from synood_jax.models import zero_shot
from synood_jax.ood import evaluation
from synood_jax.pipeline import code_version, export
from synood_jax.pipeline.run_context import RunContext, data_roots, model_paths
from synood_jax.pipeline.workdir import Workdir
from synood_jax.synthesis import context_prompts, health, procedure, sources, synthesize as synthesis
from synood_jax.synthesis import manifest as synthesis_manifest
from synood_jax.train import negatives, projection


def _save_npz(path: str, **arrays) -> None:
  fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with fileio.open_file(path) as f, np.load(io.BytesIO(f.read())) as z:
    return {k: z[k] for k in z.files}



def make_models(ctx: RunContext) -> dict:
  """The demo's tiny random models, saved in HF / diffusers format (loaded back by path later)."""
  from synood_jax.demo import tiny_clip as tiny, tiny_sd
  clip_path, sd_path = model_paths(ctx.config, ctx.wd)
  m = ctx.config.models
  made = {}
  if not fileio.is_writer():  # nothing collective here: process 0 makes them, the others wait
    return made
  if not m.clip_path:
    made["clip"] = tiny.make_tiny_clip(clip_path, seed=ctx.config.seed, **dict(m.get("tiny_clip", {})))
  if not m.sd_path:
    made["sd"] = tiny_sd.make_tiny_inpaint_pipeline(sd_path, seed=ctx.config.seed)
  return made


def make_data(ctx: RunContext) -> dict:
  """The demo's generated images: ID classes (train / val) and held-out OOD classes, plus a word list."""
  g = ctx.config.data.get("generate")
  if not g:
    return {"generated": False}
  roots = data_roots(ctx.config, ctx.wd)
  if not fileio.is_writer():
    return {"generated": True, "roots": roots}
  id_classes = {name: tuple(v) for name, v in g.id_classes.items()}
  ood_classes = {name: tuple(v) for name, v in g.ood_classes.items()}
  demo_data.write_demo_images(roots["train"], id_classes, g.train_per_class, g.image_size, seed=ctx.config.seed)
  demo_data.write_demo_images(roots["val"], id_classes, g.val_per_class, g.image_size, seed=ctx.config.seed + 1)
  demo_data.write_demo_images(roots["ood"], ood_classes, g.val_per_class, g.image_size, seed=ctx.config.seed + 2)
  for name, items in (("nouns.txt", g.nouns), ("adjectives.txt", g.adjectives)):
    fileio.write_text(os.path.join(ctx.wd.words, name), "\n".join(items) + "\n")
  return {"generated": True, "roots": roots}


def select_sources(ctx: RunContext) -> dict:
  """Per class the top-k images by JPEG bytes per pixel."""
  root = data_roots(ctx.config, ctx.wd)["train"]
  classes = ctx.class_index(root)
  if classes.subset:
    logging.warning("sources: %s has %s: a subset; each keeps its class index in the full label space",
                    root, classes.describe())
  selection = sources.select_sources(root, per_class=ctx.config.sources.per_class, class_index=classes.index)
  if fileio.is_writer():
    sources.write_source_list(ctx.wd.sources, selection.records)
  return {"root": root, "selected": len(selection.records), "classes": classes.describe(),
          "subset": classes.subset, "class_folders": len(classes.index), "label_space": len(classes.names),
          "skipped": [dict(path=s.path, reason=s.reason) for s in selection.skipped]}


def _records(path: str) -> list[sources.SourceRecord]:
  """The selected sources: the one record type from selection to the synthesis manifest's lines."""
  return list(sources.read_source_list(path))


def _synthesize(ctx: RunContext, records: list[sources.SourceRecord], source_root: str, out_dir: str) -> dict:
  """Synthesizes the sources that have a prompt; returns their counts per status and the unreadable ones."""
  c = ctx.config
  contexts = c.context.answers_file or {}
  prompts = context_prompts.prompts_for_sources(
      records, contexts, policy=c.context.policy, fallback_prompt=c.context.fallback_prompt,
      template=c.context.template, max_chars=c.context.max_chars)
  kept = [r for r in records if r.path in prompts.prompts]
  pipe, params, logits_fn = ctx.synthesis_models
  made = synthesis.synthesize(c.synthesis, out_dir, pipe, params, logits_fn, source_root, kept,
                              [prompts.prompts[r.path] for r in kept], ctx.mesh)
  done = {m["source"] for m in made}
  return {"images": len(made), "status": health.counts([health.status_of(m) for m in made]),
          "unreadable_sources": [r.path for r in kept if r.path not in done]}


def synthesize_images(ctx: RunContext) -> dict:
  """In-paint every source with boundary refinement; the demo also synthesizes from held-out ID
  images, so that the tuned model can be tested on synthetic images it never trained on."""
  root = data_roots(ctx.config, ctx.wd)
  info = _synthesize(ctx, _records(ctx.wd.sources), root["train"], ctx.wd.synthesis)
  if ctx.config.data.get("generate"):
    held = sources.select_sources(root["val"], per_class=None,
                                  class_index=ctx.class_index(root["val"]).index).records
    info["heldout"] = _synthesize(ctx, list(held), root["val"],
                                  ctx.wd.synthesis_heldout)
  ctx.release_synthesis_models()  # the later stages need no UNet, VAE or their params
  return info


def encode_negatives(ctx: RunContext) -> dict:
  """NegLabel's negative labels (a given list, or mined from a corpus with the ID class names), and
  their text features: the only time a run encodes the negative prompts."""
  settings = ctx.config.negatives.to_dict()
  if not settings["label_list"] and not settings["corpus"]:  # the demo's generated word lists
    settings["corpus"] = ",".join(os.path.join(ctx.wd.words, f) for f in ("nouns.txt", "adjectives.txt"))
  neg = evaluation.encode_negatives(ctx.clip, ctx.classnames, batch_size=int(ctx.config.eval.text_batch_size),
                                    mesh=ctx.mesh, **settings)
  if fileio.is_writer():
    neg.save(ctx.wd.negative_labels, ctx.wd.negative_features)
  return {"labels": len(neg.labels), "path": ctx.wd.negative_labels, "features": ctx.wd.negative_features}


def _encode_files(ctx: RunContext, name: str, records: list[data.Record]) -> tuple[np.ndarray, np.ndarray, list]:
  """(raw CLIP image embeddings, indices of the records read, failures): an unreadable file is skipped
  (the loader's warning names it) and counted in the stage's info."""
  f = evaluation.encode_set(ctx.clip, data.Dataset(name, records), params=ctx.clip_params,
                            batch_size=int(ctx.config.eval.batch_size), mesh=ctx.mesh)
  return f.features, np.asarray(f.indices), [x["path"] for x in f.failures]


def encode_features(ctx: RunContext) -> dict:
  """Encode the training images once (the encoder is frozen) and pseudo-label the synthetic ones."""
  root = data_roots(ctx.config, ctx.wd)["train"]
  src = _records(ctx.wd.sources)
  syn_dir = ctx.wd.synthesis
  try:
    manifest = health.training_records(list(synthesis_manifest.read_records(ctx.wd.synthesis_manifest).values()),
                                       drop_flagged=bool(ctx.config.pseudo.drop_flagged))
  except ValueError as e:
    raise data.DataError(f"features: {e}") from None
  id_feats, id_rows, id_bad = _encode_files(
      ctx, "id_sources", [data.Record(os.path.join(root, r.path), r.class_index) for r in src])
  src = [src[i] for i in id_rows]
  syn_feats, syn_rows, syn_bad = _encode_files(
      ctx, "synthetic", [data.Record(os.path.join(syn_dir, m["output"])) for m in manifest])
  manifest = [manifest[i] for i in syn_rows]
  mined = nl.pseudo_labels(zero_shot.l2_normalize(syn_feats), ctx.negatives.features)
  distinct = np.unique(mined)
  if fileio.is_writer():
    nl.write_pseudo_labels(ctx.wd.pseudo_labels, [m["output"] for m in manifest], mined,
                           ctx.negatives.words)
    _save_npz(ctx.wd.features, id_features=id_feats,
              id_labels=np.asarray([r.class_index for r in src], np.int32), syn_features=syn_feats,
              syn_negative=mined.astype(np.int32), distinct=distinct.astype(np.int32))
  return {"id_images": len(src), "synthetic_images": len(manifest), "distinct_negative_labels": int(distinct.size),
          "unreadable": {"id_sources": id_bad, "synthetic": syn_bad}}


def _features(ctx: RunContext) -> dict:
  return _load_npz(ctx.wd.features)


def train_projection(ctx: RunContext) -> dict:
  """Residual projection on the frozen image encoder: CE over [ID prompts; mined negatives]."""
  f = _features(ctx)
  neg_text = ctx.negatives.features
  position = {int(j): i for i, j in enumerate(f["distinct"])}  # mined label -> row among the distinct
  syn_rows = np.asarray([position[int(j)] for j in f["syn_negative"]], np.int32)
  text = np.concatenate([ctx.id_text, neg_text[f["distinct"]]])
  labels = projection.stage2_labels(f["id_labels"], syn_rows, len(ctx.classnames))
  params = projection.train_projection(ctx.config.stage2, np.concatenate([f["id_features"], f["syn_features"]]),
                                     labels, text, ctx.wd.stage2, ctx.mesh)
  path = ctx.wd.projection
  if fileio.is_writer():
    _save_npz(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})
  return {"path": path, "examples": int(labels.size), "classes": int(text.shape[0])}


def tune_negatives(ctx: RunContext) -> dict:
  """The mined negatives' text features, trained against the synthetic images' mined labels."""
  f = _features(ctx)
  neg_text = ctx.negatives.features
  position = {int(j): i for i, j in enumerate(f["distinct"])}
  syn_rows = np.asarray([position[int(j)] for j in f["syn_negative"]], np.int32)
  tuned = negatives.train_negative_features(ctx.config.stage3, f["syn_features"], syn_rows,
                                           neg_text[f["distinct"]], ctx.wd.stage3, ctx.mesh)
  if fileio.is_writer():
    fileio.atomic_write(ctx.wd.tuned_negatives, lambda f: np.save(f, tuned))
  return {"tuned_rows": int(tuned.shape[0])}


def tuned_model(ctx: RunContext) -> export.TunedModel:
  """The tuned model of this workdir: projection (stage 2), negatives with the tuned rows (stage 3)."""
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in _load_npz(ctx.wd.projection).items()},
                                        sep="/")
  with fileio.open_file(ctx.wd.tuned_negatives) as f:
    tuned = np.load(io.BytesIO(f.read()))
  negatives = ctx.negatives.features.copy()
  negatives[_features(ctx)["distinct"]] = np.asarray(zero_shot.l2_normalize(tuned))
  e, s2 = ctx.config.eval, ctx.config.stage2
  return export.TunedModel(ctx.clip, params, ctx.id_text, negatives, ctx.negatives.words,
                           list(ctx.classnames), groups=int(e.groups), temperature=float(e.temperature),
                           seed=int(e.seed), layernorm_eps=float(s2.layernorm_eps),
                           normalize_inputs=bool(s2.normalize_inputs), templates=tuple(ctx.templates))


def export_model(ctx: RunContext) -> dict:
  """The tuned model as a folder others can load (`export.load_tuned`)."""
  model = tuned_model(ctx)  # every process: its ID text is encoded over the mesh
  if not fileio.is_writer():
    return {"folder": ctx.wd.export}
  folder = export.export_tuned(ctx.wd.export, model, ctx.negatives.labels.prompts,
                               {"clip_source": model_paths(ctx.config, ctx.wd)[0], "code": code_version.summary()})
  return {"folder": folder}


def evaluate(ctx: RunContext) -> dict:
  """Zero-shot MCM / NegLabel and the tuned model (SynOOD) side by side."""
  e = ctx.config.eval
  specs = {}
  if ctx.config.data.get("generate"):  # the demo's held-out sets
    roots = data_roots(ctx.config, ctx.wd)
    specs = dict(id_set=f"id_val={roots['val']}",
                 ood_sets=f"ood_classes={roots['ood']},synthetic_heldout={ctx.wd.synthesis_heldout}")
  sets, id_name = evaluation.sets_from_config(e, **specs)
  if fileio.is_writer() and not e.plots:  # no plots of an earlier run left beside these results
    fileio.remove(ctx.wd.plots)
  tuned = tuned_model(ctx)
  names = ctx.config.data.classnames
  evaluation.evaluate(ctx.wd.eval, sets, id_name, clip=ctx.clip, params=ctx.clip_params,
                      classnames=ctx.classnames if names == "folders" or os.path.isfile(names) else names,
                      negatives=ctx.negatives,
                      mesh=ctx.mesh, options=evaluation.Options.from_config(e),
                      id_text={"neglabel": ctx.id_text}, methods={"synood": tuned.score_features},
                      method_templates={"synood": tuned.templates})
  return {"results": ctx.wd.results}


def write_report(ctx: RunContext) -> dict:
  """A Markdown report: the results table, source vs synthetic images, ROC curves."""
  from synood_jax.pipeline import run_report
  if not fileio.is_writer():
    return {"report": ctx.wd.report}
  return {"report": run_report.write_run_report(ctx.wd)}


# ---------------------------------------------------------------------------------------------
# The table: what each stage runs, reads and consumes (its fingerprint, provenance.py), and makes.

@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable[[RunContext], dict]
  reads: tuple[str, ...] = ()        # config groups / fields its results depend on
  consumes: tuple[str, ...] = ()     # earlier stages whose outputs it reads
  outputs: Callable[[Workdir], tuple[str, ...]] = lambda wd: ()  # folders it resumes from (cleared when stale)
  version: int = 1                   # bumped when its code changes its results (older outputs not reused)


TABLE: tuple[Stage, ...] = (
    Stage("models", make_models, reads=("seed", "models.clip_path", "models.sd_path", "models.tiny_clip")),
    Stage("data", make_data, reads=("seed", "data.generate", "data.train_root", "data.val_root")),
    Stage("sources", select_sources, reads=("data.train_root", "data.classnames", "sources"), consumes=("data",)),
    Stage("synthesis", synthesize_images,
          reads=("synthesis", "context", "models.dtype", "data.classnames", "eval.templates.neglabel"),
          consumes=("models", "data", "sources"), outputs=lambda wd: (wd.synthesis, wd.synthesis_heldout),
          version=procedure.PROCEDURE_VERSION),  # its history: synthesis/procedure.py
    Stage("negatives", encode_negatives, reads=("negatives", "models.dtype", "data.classnames"),
          consumes=("models", "data")),
    Stage("features", encode_features, reads=("pseudo", "models.dtype"),
          consumes=("models", "sources", "synthesis", "negatives")),
    Stage("stage2", train_projection, reads=("stage2", "models.dtype", "data.classnames", "eval.templates.neglabel"),
          consumes=("models", "features", "negatives"), outputs=lambda wd: (wd.stage2,)),
    Stage("stage3", tune_negatives, reads=("stage3", "models.dtype"), consumes=("models", "features", "negatives"),
          outputs=lambda wd: (wd.stage3,)),
    Stage("export", export_model,
          reads=("eval.groups", "eval.temperature", "eval.seed", "eval.templates.neglabel", "stage2.layernorm_eps",
                 "stage2.normalize_inputs"),
          consumes=("models", "negatives", "features", "stage2", "stage3"), outputs=lambda wd: (wd.export,)),
    Stage("evaluate", evaluate, reads=("eval", "data.classnames", "data.val_root", "models.dtype"),
          consumes=("models", "data", "synthesis", "negatives", "features", "stage2", "stage3")),
    Stage("report", write_report, consumes=("models", "sources", "synthesis", "stage2", "stage3", "evaluate")),
)
STAGES = tuple(s.name for s in TABLE)  # in run order
BY_NAME = {s.name: s for s in TABLE}

# Fields that change speed or logging only, never a result. eval.plots is a result: the evaluate stage
# owns eval/plots/ and removes it when plots are off. models.attention changes speed only.
NOT_RESULTS = ("synthesis.batch_size", "synthesis.decode_chunk", "synthesis.log_every_secs", "synthesis.max_not_ok",
               "stage2.checkpoint_every", "stage2.max_to_keep", "stage2.progress_every_secs",
               "stage2.tensorboard", "stage3.checkpoint_every", "stage3.max_to_keep",
               "stage3.progress_every_secs", "stage3.tensorboard", "eval.batch_size", "eval.text_batch_size",
               "eval.score_batch_size", "eval.num_threads", "eval.cache_dir")
