"""Health of synthetic images: which ones may become training data, and when a run should stop.

Each synthesized image gets one status (the first that applies, in this order):
  nonfinite        a NaN/inf in its scores, its pixels, or a refinement update of its noise eps
  degenerate       near-constant pixels (std over all pixels and channels < min_pixel_std, in [0, 1]
                   units), or a near-copy of another output of the same batch (max |diff| <= 1 grey level)
  in_distribution  the refinement left it where in-distribution images are (the rule below)
  ok               everything else: near the boundary

Failures and outcomes. `nonfinite` and `degenerate` are failures: the image is broken, never trained on,
and they stop a run. `in_distribution` is an outcome of the method (the official code keeps such images
and trains on them): counted and reported, dropped only with `pseudo.drop_flagged`, and it never stops a run.

The in-distribution rule. s = mean(g) - logsumexp(g) is at most -log C (uniform logits), so the loss
(m - s)^2 pulls s towards m* = min(m, -log C), not towards m: with the official ResNet-50 (C = 1000,
-log C = -6.908) the official m = -5 cannot be reached. A line at m - band (-7 there) would call every
image in-distribution but those within 0.09 nats of uniform. So, with s_0 the score before the first
update and s_K the last one, an image stayed in distribution when both hold:
  s_K < m* - band          it ended farther than `band` below what the loss can reach, and
  s_K < (s_0 + m*) / 2     the refinement did not carry it half way from where it started towards m*
                           (it is still nearer its in-distribution start than the boundary).
Why both: the band alone says nothing when the classifier's scale of s differs from the band's (a trained
ResNet-50 gives confident images s near -15, a 4-class CLIP near -2); the movement alone would call an
image that started near m* and stayed there in-distribution. With one iteration (s_0 = s_K) the rule
is the band around m*. For the 'msp_kl' loss, which ignores m and pulls towards uniform, m* = -log C.

A run stops when the failed images exceed `max_not_ok` of all the sources: as soon as the count seen so
far already passes that share of the total (the final share can only be higher), or earlier when at
least EARLY_MIN_IMAGES are done and at least EARLY_SHARE of them failed (a broken setting, such as
step_size=inf, fails every image; a healthy run at 5% has a chance below 1e-9 of 16 bad in 32).
`max_not_ok=1` never stops.
"""
from __future__ import annotations

import collections
import math
from typing import Mapping, Sequence

import numpy as np

STATUSES = ("ok", "nonfinite", "degenerate", "in_distribution")
FAILURES = ("nonfinite", "degenerate")   # broken images: they stop a run (in_distribution never does)
MIN_PIXEL_STD = 0.01         # in [0, 1] pixel units: 2.55 grey levels
DUPLICATE_MAX_DIFF = 1       # grey levels (uint8): equal up to rounding
EARLY_MIN_IMAGES = 32
EARLY_SHARE = 0.5


class SynthesisHealthError(RuntimeError):
  """Too many synthetic images failed; the message gives the counts and the cause."""


def highest_score(num_classes: int) -> float:
  """-log C: the largest boundary score a C-class classifier can give (uniform logits)."""
  return -math.log(num_classes)


def reachable_target(target: float, num_classes: int, loss: str = "squared") -> float:
  """m*: the score the refinement loss pulls towards. 'squared' and 'hinge' pull towards m, but s cannot
  pass -log C, so min(m, -log C); 'msp_kl' ignores m and pulls towards uniform, -log C."""
  top = highest_score(num_classes)
  return top if loss == "msp_kl" else min(float(target), top)


def target_warning(target: float, num_classes: int, loss: str = "squared") -> str | None:
  """The warning to give before synthesis when m lies above what the classifier can reach (None: m is
  reachable, or the loss ignores m)."""
  top = highest_score(num_classes)
  if loss == "msp_kl" or not float(target) > top:
    return None
  return (f"synthesis.target={float(target)} is above the highest score this classifier can give "
          f"({top:.3f} for {num_classes} classes): the refinement will push towards uniform predictions, "
          "as the official code does")


def stayed_in_distribution(first, last, *, target: float, band: float, num_classes: int,
                           loss: str = "squared") -> np.ndarray:
  """bool [B]: the refinement left the image in distribution (the rule in this module's docstring).
  first, last: s_0 and s_K per image."""
  m = reachable_target(target, num_classes, loss)
  first, last = np.asarray(first, np.float64), np.asarray(last, np.float64)
  return (last < m - band) & (last < (first + m) / 2)


def finite_step(eps, new_eps):
  """(eps', ok[B]): the updated noise per image where every value is finite, else the last finite one.

  jnp in, jnp out; traced inside the refinement loop, so that one image's diverging step neither spoils
  the others nor propagates NaN into later iterations.
  """
  import jax.numpy as jnp
  ok = jnp.all(jnp.isfinite(new_eps), axis=tuple(range(1, new_eps.ndim)))
  keep = ok.reshape((-1,) + (1,) * (new_eps.ndim - 1))
  return jnp.where(keep, new_eps, eps), ok


def near_duplicates(pixels: np.ndarray, max_diff: int = DUPLICATE_MAX_DIFF) -> np.ndarray:
  """bool [B]: image i equals some other image j of the batch within `max_diff` grey levels (uint8 NHWC)."""
  flat = pixels.reshape(pixels.shape[0], -1).astype(np.int16)
  dup = np.zeros(flat.shape[0], bool)
  for i in range(flat.shape[0]):
    for j in range(i + 1, flat.shape[0]):
      if np.abs(flat[i] - flat[j]).max() <= max_diff:
        dup[i] = dup[j] = True
  return dup


def classify_batch(images: np.ndarray, scores: np.ndarray, steps_finite: np.ndarray, *, target: float,
                   band: float, num_classes: int, loss: str = "squared",
                   min_pixel_std: float = MIN_PIXEL_STD) -> list[str]:
  """Status of each image of a batch.

  images: float [B, H, W, C] in [0, 1] as decoded (before rounding to uint8); scores: [K, B] boundary
  scores per refinement iteration; steps_finite: bool [B], False where a refinement update was non-finite;
  num_classes: C, the width of the classifier's logits.
  """
  images = np.asarray(images, np.float32)
  scores = np.asarray(scores, np.float64)
  b = images.shape[0]
  if b == 0:
    return []
  finite = (np.isfinite(images.reshape(b, -1)).all(axis=1) & np.isfinite(scores).all(axis=0)
            & np.asarray(steps_finite, bool))
  safe = np.where(np.isfinite(images), images, 0.0)
  flat = safe.reshape(b, -1).std(axis=1) < min_pixel_std
  dup = near_duplicates(np.round(np.clip(safe, 0, 1) * 255).astype(np.uint8))
  stayed = stayed_in_distribution(scores[0], scores[-1], target=target, band=band, num_classes=num_classes,
                                  loss=loss)
  out = []
  for i in range(b):
    if not finite[i]:
      out.append("nonfinite")
    elif flat[i] or dup[i]:
      out.append("degenerate")
    elif stayed[i]:
      out.append("in_distribution")
    else:
      out.append("ok")
  return out


def status_of(record: Mapping) -> str:
  """A manifest record's status (records written before statuses existed: from their ID flag)."""
  if "status" in record:
    return record["status"]
  return "in_distribution" if record.get("stayed_in_distribution") else "ok"


def counts(statuses: Sequence[str]) -> dict[str, int]:
  """{status: count} over every status, zeros included, in STATUSES order."""
  c = collections.Counter(statuses)
  return {s: int(c.get(s, 0)) for s in STATUSES}


def likely_cause(c: Mapping[str, int], config=None, among: Sequence[str] = FAILURES) -> str:
  """What most likely went wrong, from which status of `among` dominates (with the config's values if
  given)."""
  worst = max(among, key=lambda s: c.get(s, 0))
  get = (lambda k: f"={getattr(config, k, None)}") if config is not None else (lambda k: "")
  if worst == "nonfinite":
    return (f"the refinement diverged (NaN/inf): synthesis.step_size{get('step_size')} is probably too large; "
            "lower precision (models.dtype) can also overflow")
  if worst == "degenerate":
    return (f"the images collapsed to flat or identical pixels: synthesis.step_size{get('step_size')} is "
            "probably far too large (the noise leaves the sampler's range)")
  return (f"the refinement left the images in distribution (s_K below both m* - band and half way from s_0 "
          f"to m* = min(m, -log C)): raise synthesis.step_size{get('step_size')} or synthesis.iterations"
          f"{get('iterations')}, or keep them with pseudo.drop_flagged=False, as the official code does")


class Monitor:
  """Counts statuses as batches finish and raises SynthesisHealthError once the run cannot pass."""

  def __init__(self, config, total: int, where: str, initial: Sequence[str] = ()):
    self.config = config
    self.total = int(total)
    self.where = where
    self.max_share = float(getattr(config, "max_not_ok", 0.05))  # config: synthesize.Settings or config.synthesis
    self.statuses = list(initial)

  def add(self, statuses: Sequence[str]) -> None:
    self.statuses.extend(statuses)

  def verdict(self, final: bool = False, c: Mapping[str, int] | None = None) -> str | None:
    """The error message if the run must stop now (None: go on). `c`: counts to judge (default: own)."""
    c = dict(c or counts(self.statuses))
    done = sum(c.values())
    bad = sum(c[s] for s in FAILURES)
    limit = self.max_share * self.total
    early = (self.max_share < EARLY_SHARE and done >= min(EARLY_MIN_IMAGES, self.total)
             and bad >= EARLY_SHARE * done)
    if not (bad > limit or early):
      return None
    share = bad / max(done, 1)
    detail = ", ".join(f"{s} {c[s]}" for s in FAILURES)
    when = "" if final or done >= self.total else f" after {done} of {self.total} images"
    return (f"synthesis stopped{when}: {bad} of {done} images ({share:.0%}) failed ({detail}; not failures: "
            f"in_distribution {c['in_distribution']}, ok {c['ok']}); "
            f"the limit is synthesis.max_not_ok={self.max_share:g} of {self.total}. Likely cause: "
            f"{likely_cause(c, self.config)}. Statuses per image: {self.where}")

  def check(self, final: bool = False, c: Mapping[str, int] | None = None) -> None:
    msg = self.verdict(final, c)
    if msg:
      raise SynthesisHealthError(msg)


def training_records(manifest: Sequence[Mapping], *, drop_flagged: bool) -> list[Mapping]:
  """The synthetic images that go to pseudo-labelling: 'ok' ones, plus 'in_distribution' ones when
  `drop_flagged` is off (the official code keeps them); nonfinite and degenerate images never.
  Raises ValueError naming what removed every image, when nothing is left."""
  keep = {"ok"} if drop_flagged else {"ok", "in_distribution"}
  kept = [m for m in manifest if status_of(m) in keep]
  if manifest and not kept:
    c = counts([status_of(m) for m in manifest])
    parts = [f"{c[s]} of {len(manifest)} are {s} (never trained on)" for s in ("nonfinite", "degenerate") if c[s]]
    if drop_flagged and c["in_distribution"]:
      parts.append(f"pseudo.drop_flagged removed {c['in_distribution']} of {len(manifest)} (in_distribution: "
                   "the refinement left them in distribution)")
    among = FAILURES + (("in_distribution",) if drop_flagged else ())
    raise ValueError("no synthetic image is fit for pseudo-labelling: " + "; ".join(parts)
                     + f". Likely cause: {likely_cause(c, among=among)}")
  return kept

