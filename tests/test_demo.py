"""`make demo` runs end to end (briefly here) and prints its parity figures.

Run as `make demo` runs it: a separate process on the one CPU device (no fake devices).
"""

import os
import re
import subprocess
import sys


def test_demo_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "grit_jax.demo", "--out", str(tmp_path),
                           "--steps", "6"], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 1 cpu device(s)" in out
    logits = float(re.search(r"grit_jax vs transformers .*max \|diff\| = (\S+)", out).group(1))
    emb = float(re.search(r"grit_jax vs official gritlm: max \|diff\| = (\S+)", out).group(1))
    assert logits <= 1e-4 and emb <= 1e-5
    assert re.search(r"eval articles \(\d+, chance [\d.]+\): trained [\d.]+, random init", out)
    alone = float(re.search(r"same embedding alone vs in a batch: max \|diff\| = (\S+)", out).group(1))
    assert alone <= 1e-6
    assert os.path.getsize(tmp_path / "losses.png") > 1000
    # It ends with a RAG answer that reused the indexed passage's key/value states.
    doc = re.search(r"\[doc\] '(.+)' retrieved '(.+)' \(score \S+\); read (\d+) "
                    r"prompt tokens, reused (\d+) cached", out)
    assert doc and int(doc.group(4)) > 10
    assert os.path.exists(tmp_path / "rag_index" / "kv" / "kv.bin")
