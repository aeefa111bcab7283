"""`make demo` runs end to end and prints its parity figures."""

import re

from grit_jax import demo


def test_demo_runs(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    logits = float(re.search(r"grit_jax vs transformers .*max \|diff\| = (\S+)", out).group(1))
    emb = float(re.search(r"grit_jax vs official gritlm: max \|diff\| = (\S+)", out).group(1))
    assert logits <= 1e-4 and emb <= 1e-5
    assert "same embedding alone vs in a batch: max |diff| = 0.0e+00" in out
