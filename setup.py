from setuptools import find_packages, setup

setup(
    name="synood-jax",
    version="0.1.0",
    description="SynOOD (ICCV 2025) near-boundary OOD synthesis and NegLabel scoring in JAX/Flax",
    packages=find_packages(include=["synood_jax", "synood_jax.*"]),
    package_data={"synood_jax.data": ["*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",  # tokenizer and config classes only; no torch needed
        "ml_collections>=1.1.0",
        "absl-py>=2.5",
        "numpy>=2.0",
        "pillow>=10.0",
        "safetensors>=0.4",
        "matplotlib>=3.8",
    ],
    extras_require={
        # The references the tests compare against.
        "test": ["pytest>=8", "torch==2.13.0", "diffusers>=0.40", "scikit-learn>=1.5", "nltk>=3.9"],
        # Reading prepared datasets (array_record, no TensorFlow needed).
        "data": ["tensorflow-datasets>=4.9.10", "array-record"],
        "tensorboard": ["tensorboardX>=2.6"],
        "wordnet": ["nltk>=3.9"],
    },
)
