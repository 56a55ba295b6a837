"""Test setup: 8 fake CPU devices (before jax is imported), no hub, one compile cache per session."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SYNOOD_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "synood_jax_test_cache"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["SYNOOD_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
