"""Zero-shot OOD evaluation of CLIP on ImageNet-1k (MOS benchmark): MCM and NegLabel side by side.

Reproduces the zero-shot rows of SynOOD's Table 1 (NegLabel: average FPR95 25.40 / AUROC 94.21 with
CLIP ViT-B/16; MCM: 42.74 / 90.77). First turn the downloads into checked manifests:

  python launch/prepare_data.py --out_dir=/data/manifests --imagenet_val=/data/imagenet/val \
      --inaturalist=/data/iNaturalist --sun=/data/SUN --places=/data/Places --textures=/data/dtd/images

then:

  python launch/evaluate.py --config=configs/evaluate.py --workdir=/tmp/eval \
      --config.clip_path=/models/clip-vit-base-patch16 --config.data_dir=/data/manifests \
      --config.negatives.label_list=/data/neglabel_10499.txt

Variants: `configs/evaluate.py:runlocal` shrinks batch sizes for a laptop. Sets are `name` (the manifest
`<data_dir>/<name>.jsonl`) or `name=<spec>` with spec a manifest, an image folder, `list:<file>:<root>`
(OpenOOD v1.5 list) or `tfds:<name>:<split>`.
"""
import os

from synood_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config().eval               # the same fields the whole pipeline's evaluation stage reads
  c.compile_cache_dir = os.path.expanduser("~/.cache/synood_jax/xla")  # XLA compile cache ('': off)
  if arg == "runlocal":
    c.batch_size = 16
    c.text_batch_size = 64
    c.score_batch_size = 512
  return c
