"""`make demo` runs end to end (briefly here): the SmolLM2 adaptation demo and the tiny
from-scratch one.

Run as `make demo` runs it: a separate process on the one CPU device (no fake devices).
"""

import os
import re
import subprocess
import sys


def run_demo(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "demo", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 1 cpu device(s)" in proc.stdout
    return proc.stdout


def test_smollm2_demo_adapts_retrieves_and_answers_with_doc_caching(tmp_path):
    out = run_demo("--out", tmp_path, "--steps", "2")
    # held-out retrieval before and after, each with its interval and the zero-shot figure
    for label in ("zero-shot", "adapted"):
        for task in ("title -> opening passage", "sentence -> its passage"):
            assert re.search(rf"{label} {task} +\d+ queries over \d+ passages: nDCG@10 "
                             rf"[\d.]+ \[95% CI [\d.]+, [\d.]+\], top-1 [\d.]+", out), (label, task)
    assert re.search(r"loss_rep [\d.]+ -> [\d.]+, loss_gen [\d.]+ -> [\d.]+", out)
    plain = re.search(r"\[plain RAG\] .*\n +read (\d+) new prompt tokens \(reused 0 cached\)", out)
    doc = re.search(r"\[doc caching\] .*\n +read (\d+) new prompt tokens \(reused (\d+) cached\)",
                    out)
    assert plain and doc and int(doc.group(2)) > 10
    assert int(doc.group(1)) < int(plain.group(1))  # the passage came from the store
    assert os.path.exists(tmp_path / "rag_index" / "kv" / "kv.bin")


def test_tiny_demo_runs(tmp_path):
    out = run_demo("--model", "tiny", "--out", tmp_path, "--steps", "6")
    logits = float(re.search(r"grit_jax vs transformers .*max \|diff\| = (\S+)", out).group(1))
    emb = float(re.search(r"grit_jax vs official gritlm: max \|diff\| = (\S+)", out).group(1))
    assert logits <= 1e-4 and emb <= 1e-5
    assert re.search(r"eval articles \(\d+, chance [\d.]+\): trained [\d.]+, random init", out)
    alone = float(re.search(r"same embedding alone vs in a batch: max \|diff\| = (\S+)",
                            out).group(1))
    assert alone <= 1e-6
    assert os.path.getsize(tmp_path / "losses.png") > 1000
    # It ends with a RAG answer that reused the indexed passage's key/value states.
    doc = re.search(r"\[doc\] '(.+)' retrieved '(.+)' \(score \S+\); read (\d+) "
                    r"prompt tokens, reused (\d+) cached", out)
    assert doc and int(doc.group(4)) > 10
    assert os.path.exists(tmp_path / "rag_index" / "kv" / "kv.bin")
