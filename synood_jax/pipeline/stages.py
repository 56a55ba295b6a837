"""The whole SynOOD method as resumable stages over one workdir.

models -> data -> sources -> synthesis -> negatives -> features -> stage2 -> stage3 -> export -> evaluate
-> report

Each stage writes into the workdir and then `done/<stage>.json` with the fingerprint of the config
fields it reads (READS) and of the stages it consumes (CONSUMES; `provenance.py`). A rerun skips a
finished stage while its fingerprint holds, and re-runs it and everything downstream when a field it
reads changed (or refuses, with `on_change='error'`). A stage that was killed picks up where it stopped
if its inputs are unchanged (synthesis by its manifest, training by its orbax checkpoints, evaluation by
its feature cache). Every path the config names is checked before the first stage runs (`inputs.py`).

Several processes (a pod): every process runs every stage (the models and collectives are shared),
each stage starts and ends with a barrier, and what to do with each stage is process 0's plan,
broadcast, so all processes always run the same stages. Shared files are written by process 0 only
(`fileio`); the infos count global results (the merged synthesis manifest).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import json
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from synood_jax.synthesis import context_prompts, guidance, health, procedure, sources, synthesize as synthesis
from synood_jax.synthesis import manifest as synthesis_manifest
from synood_jax.data import datasets as data, imagenet as imagenet_classes
from synood_jax.demo import images as demo_data
from synood_jax.ood import evaluation
from synood_jax.pipeline import code_version, export, inputs, lock, provenance, staging, values
from synood_jax.pipeline.workdir import Workdir
from synood_jax.train import negatives, projection
from synood_jax.labels import negative_labels as nl
from synood_jax import fileio, parallel, runtime
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
  if d.get("generate"):  # generated images live in the workdir, whatever the roots say (inputs.py refuses both)
    return {name: wd.path("data", name) for name in ("train", "val", "ood")}
  return {"train": d.train_root or wd.path("data", "train"), "val": d.get("val_root") or wd.path("data", "val"), "ood": wd.path("data", "ood")}


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
    return clip.from_pretrained(model_paths(self.config, self.wd)[0], dtype=jnp.dtype(self.config.models.dtype),
                                attention=self.config.models.get("attention", "auto"))

  def class_index(self, root: str) -> imagenet_classes.ClassIndex:
    """Each class folder of `root`'s class index, from its name (a wnid, or a class file's entry)."""
    return imagenet_classes.class_index(sources.class_folders(root), self.config.data.classnames, root)

  @functools.cached_property
  def classnames(self) -> list[str]:
    """The label space: every class name by index (a subset of folders still has all of them)."""
    names = self.config.data.classnames
    if names == "folders":
      return sources.class_folders(data_roots(self.config, self.wd)["train"])
    return imagenet_classes.class_names(names)

  @functools.cached_property
  def templates(self) -> list[str]:
    """The ID prompts of NegLabel, which SynOOD's guidance, training and tuned score use."""
    return imagenet_classes.load_templates(self.config.eval.templates.neglabel)

  @functools.cached_property
  def id_text(self) -> np.ndarray:
    """Normalised ID class text features (the NegLabel / SynOOD prompt)."""
    return zero_shot.class_text_features(self.clip, self.clip.params, self.classnames, self.templates,
                                         int(self.config.eval.text_batch_size), self.mesh)

  @functools.cached_property
  def negatives(self) -> evaluation.Negatives:
    """The negative labels and their text features, as the negatives stage encoded them (once)."""
    return evaluation.Negatives.load(self.wd.negative_labels, self.wd.negative_features)

  @functools.cached_property
  def synthesis_models(self):
    """(in-painting pipeline, params sharded on the mesh incl. the classifier's, logits_fn)."""
    from synood_jax.diffusion import pipeline
    c = self.config
    pipe, params = pipeline.load_inpaint_pipeline(model_paths(c, self.wd)[1], dtype=jnp.dtype(c.models.dtype),
                                                  scheduler=c.synthesis.get("scheduler") or None,
                                                  attention=c.models.get("attention", "auto"))
    logits_fn, params["classifier"] = _guidance(self)
    return pipe, parallel.shard_params(params, self.mesh, self.config.mesh.sharding_rules), logits_fn

  @functools.cached_property
  def clip_params(self):
    """CLIP's params placed on the mesh by the sharding rules."""
    return parallel.shard_params(self.clip.params, self.mesh, self.config.mesh.sharding_rules)


def _save_npz(path: str, **arrays) -> None:
  fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with fileio.open_file(path) as f, np.load(io.BytesIO(f.read())) as z:
    return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# Stages.

def stage_models(ctx: Context) -> dict:
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


def stage_data(ctx: Context) -> dict:
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


def stage_sources(ctx: Context) -> dict:
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


def _records(path: str) -> list[dict]:
  return [dataclasses.asdict(r) for r in sources.read_source_list(path)]


def _guidance(ctx: Context):
  """The frozen classifier of the boundary score (`guidance.CLASSIFIERS`: CLIP zero-shot or ResNet-50)."""
  return guidance.classifier(ctx.config.synthesis, ctx)


def _synthesize(ctx: Context, records: list[dict], source_root: str, out_dir: str) -> dict:
  """Synthesizes the sources that have a prompt; returns their counts per status and the unreadable ones."""
  c = ctx.config
  contexts = c.context.answers_file or {}
  prompts = context_prompts.prompts_for_sources(
      records, contexts, policy=c.context.policy, fallback_prompt=c.context.fallback_prompt,
      template=c.context.template, max_chars=c.context.max_chars)
  kept = [r for r in records if r["path"] in prompts.prompts]
  pipe, params, logits_fn = ctx.synthesis_models
  made = synthesis.synthesize(c.synthesis, out_dir, pipe, params, logits_fn, source_root, kept,
                              [prompts.prompts[r["path"]] for r in kept], ctx.mesh)
  done = {m["source"] for m in made}
  return {"images": len(made), "status": health.counts([health.status_of(m) for m in made]),
          "unreadable_sources": [r["path"] for r in kept if r["path"] not in done]}


def stage_synthesis(ctx: Context) -> dict:
  """In-paint every source with boundary refinement; the demo also synthesizes from held-out ID
  images, so that the tuned model can be tested on synthetic images it never trained on."""
  root = data_roots(ctx.config, ctx.wd)
  info = _synthesize(ctx, _records(ctx.wd.sources), root["train"], ctx.wd.synthesis)
  if ctx.config.data.get("generate"):
    held = sources.select_sources(root["val"], per_class=None,
                                  class_index=ctx.class_index(root["val"]).index).records
    info["heldout"] = _synthesize(ctx, [dataclasses.asdict(r) for r in held], root["val"],
                                  ctx.wd.synthesis_heldout)
  ctx.__dict__.pop("synthesis_models", None)  # the later stages need no UNet, VAE or their params
  return info


def stage_negatives(ctx: Context) -> dict:
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


def _encode_files(ctx: Context, name: str, records: list[data.Record]) -> tuple[np.ndarray, np.ndarray, list]:
  """(raw CLIP image embeddings, indices of the records read, failures): an unreadable file is skipped
  (the loader's warning names it) and counted in the stage's info."""
  f = evaluation.encode_set(ctx.clip, data.Dataset(name, records), params=ctx.clip_params,
                            batch_size=int(ctx.config.eval.batch_size), mesh=ctx.mesh)
  return f.features, np.asarray(f.indices), [x["path"] for x in f.failures]


def stage_features(ctx: Context) -> dict:
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
      ctx, "id_sources", [data.Record(os.path.join(root, r["path"]), r["class_index"]) for r in src])
  src = [src[i] for i in id_rows]
  syn_feats, syn_rows, syn_bad = _encode_files(
      ctx, "synthetic", [data.Record(os.path.join(syn_dir, m["output"])) for m in manifest])
  manifest = [manifest[i] for i in syn_rows]
  mined = nl.pseudo_labels(zero_shot.l2_normalize(syn_feats), ctx.negatives.features)
  distinct = np.unique(mined)
  if fileio.is_writer():
    nl.write_pseudo_labels(ctx.wd.pseudo_labels, [m["output"] for m in manifest], mined,
                           ctx.negatives.labels.labels)
    _save_npz(ctx.wd.features, id_features=id_feats,
              id_labels=np.asarray([r["class_index"] for r in src], np.int32), syn_features=syn_feats,
              syn_negative=mined.astype(np.int32), distinct=distinct.astype(np.int32))
  return {"id_images": len(src), "synthetic_images": len(manifest), "distinct_negative_labels": int(distinct.size),
          "unreadable": {"id_sources": id_bad, "synthetic": syn_bad}}


def _features(ctx: Context) -> dict:
  return _load_npz(ctx.wd.features)


def stage_stage2(ctx: Context) -> dict:
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


def stage_stage3(ctx: Context) -> dict:
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


def tuned_model(ctx: Context) -> export.TunedModel:
  """The tuned model of this workdir: projection (stage 2), negatives with the tuned rows (stage 3)."""
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in _load_npz(ctx.wd.projection).items()},
                                        sep="/")
  with fileio.open_file(ctx.wd.tuned_negatives) as f:
    tuned = np.load(io.BytesIO(f.read()))
  negatives = ctx.negatives.features.copy()
  negatives[_features(ctx)["distinct"]] = np.asarray(zero_shot.l2_normalize(tuned))
  e, s2 = ctx.config.eval, ctx.config.stage2
  return export.TunedModel(ctx.clip, params, ctx.id_text, negatives, list(ctx.negatives.labels.labels),
                           list(ctx.classnames), groups=int(e.groups), temperature=float(e.temperature),
                           seed=int(e.seed), layernorm_eps=float(s2.layernorm_eps),
                           normalize_inputs=bool(s2.normalize_inputs), templates=tuple(ctx.templates))


def stage_export(ctx: Context) -> dict:
  """The tuned model as a folder others can load (`export.load_tuned`)."""
  model = tuned_model(ctx)  # every process: its ID text is encoded over the mesh
  if not fileio.is_writer():
    return {"folder": ctx.wd.export}
  folder = export.export_tuned(ctx.wd.export, model, ctx.negatives.labels.prompts,
                               {"clip_source": model_paths(ctx.config, ctx.wd)[0], "code": code_version.summary()})
  return {"folder": folder}


def stage_evaluate(ctx: Context) -> dict:
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


def stage_report(ctx: Context) -> dict:
  """A Markdown report: the results table, source vs synthetic images, ROC curves."""
  from synood_jax.pipeline import report
  if not fileio.is_writer():
    return {"report": ctx.wd.report}
  return {"report": report.write_run_report(ctx.wd)}


STAGE_FNS: dict[str, Callable[[Context], dict]] = {
    "models": stage_models, "data": stage_data, "sources": stage_sources, "synthesis": stage_synthesis,
    "negatives": stage_negatives, "features": stage_features, "stage2": stage_stage2,
    "stage3": stage_stage3, "export": stage_export, "evaluate": stage_evaluate, "report": stage_report,
}


# ---------------------------------------------------------------------------------------------
# What each stage reads and consumes: its fingerprint (provenance.py) and which stages a change re-runs.

READS: dict[str, tuple[str, ...]] = {  # config groups / fields; in stage order
    "models": ("seed", "models.clip_path", "models.sd_path", "models.tiny_clip"),
    "data": ("seed", "data.generate", "data.train_root", "data.val_root"),
    "sources": ("data.train_root", "data.classnames", "sources"),
    "synthesis": ("synthesis", "context", "models.dtype", "data.classnames", "eval.templates.neglabel"),
    "negatives": ("negatives", "models.dtype", "data.classnames"),
    "features": ("pseudo", "models.dtype"),
    "stage2": ("stage2", "models.dtype", "data.classnames", "eval.templates.neglabel"),
    "stage3": ("stage3", "models.dtype"),
    "export": ("eval.groups", "eval.temperature", "eval.seed", "eval.templates.neglabel", "stage2.layernorm_eps",
               "stage2.normalize_inputs"),
    "evaluate": ("eval", "data.classnames", "data.val_root", "models.dtype"),
    "report": (),
}
CONSUMES: dict[str, tuple[str, ...]] = {
    "sources": ("data",),
    "synthesis": ("models", "data", "sources"),
    "negatives": ("models", "data"),
    "features": ("models", "sources", "synthesis", "negatives"),
    "stage2": ("models", "features", "negatives"),
    "stage3": ("models", "features", "negatives"),
    "export": ("models", "negatives", "features", "stage2", "stage3"),
    "evaluate": ("models", "data", "synthesis", "negatives", "features", "stage2", "stage3"),
    "report": ("models", "sources", "synthesis", "stage2", "stage3", "evaluate"),
}
# Bumped when a stage's code changes its results (so older outputs are not reused).
VERSIONS = {"synthesis": procedure.PROCEDURE_VERSION}  # its history: synthesis/procedure.py
# Fields that change speed or logging only, never a result.
NOT_RESULTS = ("synthesis.batch_size", "synthesis.decode_chunk", "synthesis.log_every_secs", "synthesis.max_not_ok",
               "stage2.checkpoint_every", "stage2.max_to_keep", "stage2.progress_every_secs",
               "stage2.tensorboard", "stage3.checkpoint_every", "stage3.max_to_keep",
               "stage3.progress_every_secs", "stage3.tensorboard", "eval.batch_size", "eval.text_batch_size",
               "eval.score_batch_size", "eval.num_threads", "eval.cache_dir")
# eval.plots is a result: the evaluate stage owns eval/plots/ and removes it when plots are off.


def _outputs(wd: Workdir, stage: str) -> tuple[str, ...]:
  """Folders a stage resumes from: cleared when its inputs changed, so nothing stale is reused."""
  return {"synthesis": (wd.synthesis, wd.synthesis_heldout), "stage2": (wd.stage2,),
          "stage3": (wd.stage3,), "export": (wd.export,)}.get(stage, ())


@dataclasses.dataclass
class Step:
  stage: str
  action: str             # 'skip' (done, same inputs), 'run' (new), 'resume' (started, same inputs), 'rerun'
  changes: list[str]      # why a 'rerun'


def plan(config, wd: Workdir, stages: list[str]) -> tuple[dict, list[Step]]:
  """(fingerprints, what to do with each requested stage). Raises when a stage would read a stale or
  missing input that this run does not make, and (config.on_change='error') when a finished stage's
  inputs changed."""
  fps = provenance.fingerprints(config, READS, CONSUMES, VERSIONS, NOT_RESULTS, code=code_version.current())
  steps, will_be_valid = [], set()
  done = {name: provenance.read_json(wd.done(name)) for name in STAGES}
  for name in STAGES:
    if done[name] is not None and not provenance.changes(done[name].get("provenance"), fps[name]):
      will_be_valid.add(name)
  for name in stages:
    if name in will_be_valid:
      steps.append(Step(name, "skip", []))
      continue
    if done[name] is not None:
      steps.append(Step(name, "rerun", provenance.changes(done[name].get("provenance"), fps[name])))
    else:
      started = provenance.read_json(wd.started(name))
      partial = any(fileio.exists(p) for p in _outputs(wd, name))
      diff = provenance.changes(started, fps[name]) if (started or partial) else []
      steps.append(Step(name, "rerun", diff) if diff else Step(name, "resume" if started else "run", []))
    missing = [u for u in CONSUMES.get(name, ()) if u not in will_be_valid]
    if missing:
      raise ValueError(f"stage {name} needs stage(s) {missing}, which are not done with this config and "
                       f"are not part of this run: add them to --stages (or run every stage)")
    will_be_valid.add(name)
  changed = [s for s in steps if s.action == "rerun"]
  if changed and config.get("on_change", "rerun") == "error":
    lines = [f"  {s.stage}: " + "; ".join(s.changes) for s in changed]
    raise ValueError(f"{wd.root}: the config changed for stage(s) made before (config.on_change=error):\n"
                     + "\n".join(lines) + "\nUse another --workdir, or --config.on_change=rerun to redo them.")
  return fps, steps


def run(config, workdir: str, stages=None) -> dict:
  """Run `stages` (default: all) in order, skipping the finished ones whose inputs did not change.
  Returns each stage's info.

  On several processes every one calls this with the same arguments (the README's pod launch)."""
  stages = list(STAGES if not stages else stages)
  unknown = [s for s in stages if s not in STAGE_FNS]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {STAGES}")
  values.validate(config)  # every value, before any stage runs or any output is touched
  stages = [s for s in STAGES if s in stages]  # stage order, whatever order they were given in
  wd = Workdir(workdir)
  if fileio.is_writer():
    fileio.makedirs(wd.root)
  runtime.check_shared_dir(wd.root)
  with lock.hold_for_job(wd.root):  # one run at a time: a second one refuses here, naming this one
    if fileio.is_writer():
      staging.recover(wd)
    runtime.barrier("pipeline: workdir recovered")
    fps, steps = plan(config, wd, stages)
    # Process 0's plan for every process (each read the same markers, but one must decide).
    steps = [Step(**step) for step in runtime.gather_json([dataclasses.asdict(st) for st in steps])[0]]
    inputs.validate(config, [s.stage for s in steps if s.action != "skip"])  # before hours of work, not after
    if fileio.is_writer():
      provenance.write_json(wd.config, {**json.loads(config.to_json_best_effort(sort_keys=True)),
                                        "code": code_version.summary()})
    ctx = Context(config, wd)
    infos = {step.stage: _run_stage(ctx, step, fps[step.stage]) for step in steps}
    runtime.barrier("pipeline: finished")
  return infos


def _run_stage(ctx: Context, step: Step, fp: provenance.Fingerprint) -> dict:
  """One stage between two barriers: process 0 clears stale outputs and marks it started before, and
  marks it done after every process finished it."""
  name, wd = step.stage, ctx.wd
  if step.action == "skip":
    logging.info("stage %s: already done with this config (%s)", name, wd.done(name))
    return provenance.read_json(wd.done(name))
  if step.action == "rerun":
    logging.warning("stage %s: inputs changed since it ran, re-running it (%s)", name, "; ".join(step.changes))
  folders = _outputs(wd, name)
  # A finished stage's outputs stay until its rerun's are complete: the rerun writes beside them.
  beside = runtime.agreed(bool(step.action == "rerun" and folders and fileio.exists(wd.done(name))))
  if fileio.is_writer():
    if beside:
      started = provenance.read_json(wd.started(name)) or {}
      staging.prepare(wd, name, folders, resume=started.get("fingerprint") == fp.value)
    else:
      for path in [wd.done(name), *folders] if step.action == "rerun" else []:
        fileio.remove(path)
    provenance.write_json(wd.started(name), fp.as_dict())
  runtime.barrier(f"stage {name}: start")
  start = time.perf_counter()
  logging.info("stage %s: %s", name, "resuming" if step.action == "resume" else "starting")
  ctx.wd = staging.staged(wd, folders) if beside else wd
  try:
    info = STAGE_FNS[name](ctx) or {}
  finally:
    ctx.wd = wd
  info["seconds"] = round(time.perf_counter() - start, 2)
  info["provenance"] = fp.as_dict()
  runtime.barrier(f"stage {name}: end")  # every process's files are in place before the marker
  if beside:
    info = staging.final_paths(info, wd)  # its paths as they are after the swap
  if fileio.is_writer():
    if beside:
      staging.swap(wd, name, folders, info)
    else:
      provenance.write_json(wd.done(name), info)
  logging.info("stage %s: done in %.1f s", name, info["seconds"])
  return info
