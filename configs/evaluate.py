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

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.clip_path = ""                      # HF CLIP folder (config.json, weights, tokenizer, preprocessor)
  c.dtype = "float32"
  c.data_dir = ""                       # prepared manifests (launch/prepare_data.py --out_dir)
  c.id_set = "imagenet_val"
  c.ood_sets = "inaturalist,sun,places,textures"
  c.classnames = "imagenet"             # builtin CLIP-cleaned ImageNet names, or a file
  c.templates = "neglabel"              # 'neglabel' ('the nice {}'), 'mcm' ('a photo of a {}.'), 'clip80', or one template
  c.negatives = ml_collections.ConfigDict()
  c.negatives.label_list = ""           # NegLabel list (text 'the nice X' / 'This is a X photo', or our JSON)
  c.negatives.corpus = ""               # or mine: a WordNet dict folder, or 'nouns.txt,adjectives.txt'
  c.negatives.percentile = 0.95
  c.negatives.keep_fraction = 0.15
  c.scores = "mcm,neglabel"
  c.groups = 100                        # NegLabel grouping
  c.temperature = 0.01                  # NegLabel: logits = cos / T
  c.seed = 0                            # NegLabel grouping permutation
  c.mcm_temperature = 1.0               # MCM's softmax temperature
  c.tuned_method = "synood"             # name of the method added by evaluate(image_transform=..., negative_features=...)
  c.batch_size = 256                    # images per step (rounded up to a multiple of the devices)
  c.text_batch_size = 1000
  c.score_batch_size = 4096
  c.num_threads = 0                     # decode threads (0: 2 x cores, at most 16)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.cache_dir = ""                      # feature cache ('' : <workdir>/cache)
  c.allow_partial = False               # go on when listed files are missing (they are still reported)
  c.verify = "exists"                   # before evaluating: 'exists', 'header' or 'decode' every file
  c.plots = True
  c.compile_cache_dir = os.path.expanduser("~/.cache/synood_jax/xla")  # XLA compile cache ('': off)
  if arg == "runlocal":
    c.batch_size = 16
    c.text_batch_size = 64
    c.score_batch_size = 512
  return c
