"""synood-jax: SynOOD near-boundary OOD synthesis and NegLabel OOD scoring in JAX/Flax."""
