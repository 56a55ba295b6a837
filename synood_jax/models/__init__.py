"""Flax models that load Hugging Face / diffusers / torchvision checkpoints."""
