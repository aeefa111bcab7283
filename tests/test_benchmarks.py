"""The speed benchmarks run end to end on a tiny model, and both sides compute the same thing.

Timings are not asserted (they depend on the machine); what is asserted is what makes a
side-by-side figure meaningful: the same losses, embeddings and tokens on both sides.
"""

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    """Import benchmark scripts as modules; results go to tmp_path."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setenv("BENCHMARK_RESULTS_DIR", str(tmp_path))

    def load(name):
        __import__(name)
        return sys.modules[name]

    def result(name):
        with open(tmp_path / f"{name}.json") as f:
            return json.load(f)

    load.result = result
    return load


def test_train_step_same_losses_as_reference(bench):
    out = bench("train_step_speed").main(["--shape", "m5", "--lengths", "16,24,32", "--repeats", "1"])
    assert out == bench.result("train_step_speed")
    first = {k: abs(out["losses"]["grit_jax"][0][k] - out["losses"]["reference"][0][k])
             / out["losses"]["reference"][0][k] for k in ("loss", "loss_rep", "loss_gen")}
    assert max(first.values()) <= 1e-5, first  # same weights and batch: the same step
    assert out["losses_max_rel_diff"] <= 1e-3  # after one AdamW update on each side
    for side in ("grit_jax", "reference"):
        assert out[side]["step_s"] > 0 and 0 < out[side]["mfu_vs_measured_peak"]
    assert out["matmul_peak_gflops"] > 0


def test_encode_same_embeddings_as_gritlm(bench):
    out = bench("encode_speed").main(["--shape", "m5", "--texts", "6", "--words", "30",
                                      "--batch-size", "4", "--repeats", "1"])
    assert out["embeddings_max_abs_diff"] <= 1e-5
    assert out["grit_jax"]["texts_per_s"] > 0 and out["reference"]["texts_per_s"] > 0


def test_generate_same_tokens_as_transformers(bench):
    out = bench("generate_speed").main(["--shape", "m5", "--new-tokens", "12", "--repeats", "1"])
    assert out["same_tokens"] is True and out["new_tokens"] == 12
    assert [m["matrix"] for m in out["matvec"]] == [[64, 192], [64, 32000]]


def test_scaling_and_profile_run(bench):
    out = bench("scaling").main(["--shape", "m5", "--lengths", "16,32", "--batches", "1,2",
                                 "--repeats", "1"])
    assert [(p["batch"], p["length"]) for p in out["points"]] == [(1, 16), (1, 32), (2, 16)]
    prof = bench("profile_step").main(["--shape", "m5", "--lengths", "12,16,16", "--top", "5"])
    for side in ("grit_jax", "reference"):
        assert "matmul" in prof[side]["by_kind"] and len(prof[side]["top_ops"]) == 5


def test_attention_kernels_agree(bench):
    out = bench("attention_cpu").main(["--lengths", "80", "--heads", "4,2,8", "--repeats", "1"])
    for cell in out["results"]["80"].values():
        assert cell["xla_max_abs_diff"] <= 1e-5 and cell["blocked_max_abs_diff"] <= 1e-5
