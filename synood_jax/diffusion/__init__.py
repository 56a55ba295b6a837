"""Flax Stable Diffusion in-painting: schedulers, pipeline loader, sampler.

    from synood_jax.diffusion import load_inpaint_pipeline
    pipe, params = load_inpaint_pipeline(folder)
    images = pipe(params, prompt, image, mask_image, strength=0.6, seed=0)   # pipeline.inpaint
"""
from synood_jax.diffusion.inpaint_pipeline import InpaintPipeline, inpaint_images, load_inpaint_pipeline

__all__ = ["InpaintPipeline", "inpaint_images", "load_inpaint_pipeline"]
