"""Guidance classifiers f(x) for the boundary score s = mean(f(x)) - logsumexp(f(x)).

Each is (logits_fn(params, images), params) with images NHWC float in [0, 1] (decoded in-paintings), and
differentiable preprocessing in JAX, so the refinement loop can take gradients through it.
`CLASSIFIERS` maps config.synthesis.classifier to its builder: a new one is a function and a line there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from synood_jax.models import zero_shot
from synood_jax.models import clip_preprocess, resnet


def clip_zero_shot(bundle, class_text_features, preprocess=None, logit_scale: float = 100.0):
  """CLIP zero-shot: g = logit_scale * cos(E_img(x), T_c) over the ID class prompts (no extra model).

  Preprocessing follows CLIPImageProcessor (shortest side, centre crop, normalize), with an
  antialiased bicubic resize in JAX in place of PIL's.
  """
  cfg = preprocess or clip_preprocess.load_config(bundle.folder)

  def logits_fn(params, images):
    x = resnet.classifier_preprocess(images, resize=cfg.shortest_edge, crop=cfg.crop_height,
                                     mean=cfg.image_mean, std=cfg.image_std, method="bicubic")
    f = zero_shot.l2_normalize(bundle.encode_image(params["clip"], x).astype(jnp.float32))
    return logit_scale * f @ params["text"].T

  return logits_fn, {"clip": bundle.params, "text": jnp.asarray(class_text_features, jnp.float32)}


def resnet50(module, params, resize: int = 232, crop: int = 224):
  """torchvision's ImageNet ResNet-50 with its IMAGENET1K_V2 transforms (the official choice)."""
  def logits_fn(p, images):
    return module.apply({"params": p}, resnet.classifier_preprocess(images, resize=resize, crop=crop))
  return logits_fn, params


def num_classes(logits_fn, classifier_params, image_size: int) -> int:
  """C, the width of the classifier's logits: traced on an abstract image, nothing is computed."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return int(jax.eval_shape(logits_fn, classifier_params, image).shape[-1])


# ---------------------------------------------------------------------------------------------
# The registry. Each builder: (config.synthesis, models) -> (logits_fn, params), where `models` gives, when
# asked (a lazy context such as the pipeline's), `clip` (a CLIP bundle) and `id_text` (the ID class prompts'
# features [C, D]); a builder reads only what it needs.

def _clip(g, models):
  return clip_zero_shot(models.clip, models.id_text, logit_scale=float(g.clip_logit_scale))


def _resnet50(g, models):
  del models
  return resnet50(*resnet.load(g.resnet_path))


CLASSIFIERS = {"clip": _clip, "resnet50": _resnet50}


def classifier(g, models):
  """The frozen classifier of the boundary score that config.synthesis (`g`) names."""
  if g.classifier not in CLASSIFIERS:
    raise ValueError(f"config.synthesis.classifier: {g.classifier!r} is not one of {sorted(CLASSIFIERS)}")
  return CLASSIFIERS[g.classifier](g, models)
