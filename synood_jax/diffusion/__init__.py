"""Flax Stable Diffusion in-painting: schedulers, pipeline loader, sampler."""
