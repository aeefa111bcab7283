"""The notebooks run top to bottom (nbclient, small parameters injected after the cell tagged
"parameters", as papermill does) and each opens in Colab from its repository path."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
LIBTPU = os.path.join(ROOT, ".venv", "libtpu", "libtpu", "libtpu.so")

SMALL = {
    "quickstart.ipynb": {"STEPS": 4, "N_DOCS": 6, "REPEATS": 1},
    "train.ipynb": {"STEPS": 6},
    "tpu.ipynb": {"CONFIG": "configs/tiny.py", "TOPOLOGY": "v5p:2x2x2", "LENGTHS": "32,64,64"},
}


def load(name):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_every_notebook_is_tested():
    assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_is_clean_and_opens_in_colab(name):
    nb = load(name)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and not c.get("execution_count")
               for c in nb.cells if c.cell_type == "code"), "store notebooks without outputs"
    badge = re.search(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/"
                      r"(\S+?)\)", nb.cells[0].source)
    assert badge and badge.group(2) == f"notebooks/{name}"
    url = re.search(r'url="([^"]+)"', open(os.path.join(ROOT, "setup.py")).read()).group(1)
    assert url == f"https://github.com/{badge.group(1)}", "badge and setup.py's url disagree"
    # The setup cell installs the project the badge points at.
    assert f'REPO = "https://github.com/{badge.group(1)}"' in nb.cells[1].source
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and all(f"{k} = " in tagged[0].source for k in SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, tmp_path):
    nb = load(name)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = dict(SMALL[name])
    if name != "tpu.ipynb":
        overrides["WORKDIR"] = str(tmp_path / "work")
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        "# injected by the tests\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    if name == "tpu.ipynb" and not os.path.exists(LIBTPU):
        pytest.skip("libtpu is not installed (make venv puts it in .venv/libtpu)")
    # One CPU device, as `make demo` runs: the suite's 8 fake devices are for sharding tests.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env = {k: v for k, v in env.items() if k != "MPLBACKEND"}  # the kernel draws figures inline
    env.update(JAX_PLATFORMS="cpu", PYDEVD_DISABLE_FILE_VALIDATION="1")
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on failure
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if name == "quickstart.ipynb":
        assert len(images) == 2 and "top-1 title -> passage accuracy" in text
        for mode in ("plain RAG", "query", "doc", "query-doc", "doc-query"):
            assert f"[{mode:>9}] retrieved" in text
    if name == "train.ipynb":
        assert len(images) == 1
        logits = float(re.search(r"logits \(causal\), grit_jax vs transformers: max \|diff\| = "
                                 r"(\S+)", text).group(1))
        emb = float(re.search(r"embeddings, grit_jax vs transformers \(bidirectional, mean\): "
                              r"max \|diff\| = ([^;]+);", text).group(1))
        assert logits < 1e-4 and emb < 1e-4, (logits, emb)
    if name == "tpu.ipynb":
        assert len(images) == 1 and "fits" in text and "implied MFU" in text
        assert text.count("--dry-run  (exit 0)") == 4 and "gcloud compute tpus" in text
        assert json.load(open("/tmp/aot_report.json"))["topology"] == "v5p:2x2x2"
