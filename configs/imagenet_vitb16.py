"""SynOOD on ImageNet-1k with CLIP ViT-B/16 (the paper's Table 1: average FPR95 14.27, AUROC 97.01).

Every path is a config field; nothing is downloaded at run time.

  python launch/pipeline.py --config=configs/imagenet_vitb16.py --workdir=/runs/synood_b16 \
      --config.models.clip_path=/models/clip-vit-base-patch16 \
      --config.models.sd_path=/models/stable-diffusion-2-inpainting \
      --config.synthesis.resnet_path=/models/resnet50_imagenet1k_v2.pth \
      --config.data.train_root=/data/imagenet/train \
      --config.context.answers_file=/data/llava_answers.jsonl \
      --config.negatives.label_list=/data/neglabel_10499.txt \
      --config.eval.data_dir=/data/manifests      # from launch/prepare_data.py

On a pod or multi-node GPU mesh add --config.multi_host=True and run the same command on every host;
--config.mesh.fsdp=N shards the UNet's parameters N ways. Variant `:bf16` runs the networks in bfloat16.
"""
from synood_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.models.clip_path = "/models/clip-vit-base-patch16"
  c.models.sd_path = "/models/stable-diffusion-2-inpainting"
  c.data.train_root = "/data/imagenet/train"
  c.synthesis.resnet_path = "/models/resnet50_imagenet1k_v2.pth"  # torchvision IMAGENET1K_V2
  c.synthesis.batch_size = 64
  c.synthesis.decode_chunk = 8
  if arg == "bf16":
    c.models.dtype = "bfloat16"
  return c
