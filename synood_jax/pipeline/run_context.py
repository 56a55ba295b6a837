"""What the stages of one run share: the paths the config names (or the demo makes) and the models, each
loaded once, lazily, when a stage first asks for it (a synthesis-only run never loads CLIP unless its
guidance is CLIP's)."""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from synood_jax import parallel
from synood_jax.data import imagenet as imagenet_classes
from synood_jax.diffusion import inpaint_pipeline as inpaint_pipeline
from synood_jax.models import clip as clip_lib, zero_shot
from synood_jax.ood import evaluation
from synood_jax.pipeline.workdir import Workdir
from synood_jax.synthesis import guidance, sources


def model_paths(config, wd: Workdir) -> tuple[str, str]:
  """(CLIP folder, SD in-painting folder): the config's, or the tiny ones the models stage makes."""
  m = config.models
  return (m.clip_path or wd.demo_clip, m.sd_path or wd.demo_sd)


def data_roots(config, wd: Workdir) -> dict[str, str]:
  """Source images (ID train), plus for the demo the generated held-out sets."""
  d = config.data
  if d.get("generate"):  # generated images live in the workdir, whatever the roots say (inputs.py refuses both)
    return {name: wd.path("data", name) for name in ("train", "val", "ood")}
  return {"train": d.train_root or wd.path("data", "train"), "val": d.get("val_root") or wd.path("data", "val"),
          "ood": wd.path("data", "ood")}


@dataclasses.dataclass
class RunContext:
  """Lazily loaded models shared by the stages of one run."""
  config: object
  wd: Workdir

  @functools.cached_property
  def mesh(self):
    return parallel.make_mesh(self.config.mesh.data, self.config.mesh.fsdp)

  @functools.cached_property
  def clip(self):
    return clip_lib.from_pretrained(model_paths(self.config, self.wd)[0], dtype=jnp.dtype(self.config.models.dtype),
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
    c = self.config
    pipe, params = inpaint_pipeline.load_inpaint_pipeline(
        model_paths(c, self.wd)[1], dtype=jnp.dtype(c.models.dtype), scheduler=c.synthesis.get("scheduler") or None,
        attention=c.models.get("attention", "auto"))
    logits_fn, params["classifier"] = guidance.classifier(c.synthesis, self)  # guidance.CLASSIFIERS
    return pipe, parallel.shard_params(params, self.mesh, self.config.mesh.sharding_rules), logits_fn

  def release_synthesis_models(self) -> None:
    """Drop the UNet, VAE, classifier and their params (the next access loads them again)."""
    self.__dict__.pop("synthesis_models", None)  # how functools.cached_property forgets a value

  @functools.cached_property
  def clip_params(self):
    """CLIP's params placed on the mesh by the sharding rules."""
    return parallel.shard_params(self.clip.params, self.mesh, self.config.mesh.sharding_rules)
