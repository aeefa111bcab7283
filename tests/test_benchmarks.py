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


def test_cpu_speed_runs_every_side_by_side_benchmark_with_the_same_results(bench):
    """cpu_speed --quick: generate, encode, RAG and two train steps, each side computing the same
    thing as its reference, and the summary naming the machine and every ratio."""
    out = bench("cpu_speed").main(["--quick"])
    assert out == bench.result("cpu_speed_quick")
    assert "CPUs; jax" in out["machine"] and out["matmul_peak_gflops"]["jax"] > 0
    assert all(row["same_result"] in (True, None) for row in out["ratios"]), out["ratios"]
    assert len(out["ratios"]) == 2 + 10 + 2 and all(r["speedup_vs_reference"] > 0
                                                    for r in out["ratios"])

    gen = bench.result("generate_speed_quick")
    assert gen["same_tokens"] is True and gen["new_tokens"] == 8
    assert [m["matrix"] for m in gen["matvec"]] == [[64, 192], [64, 32000]]
    rss = [gen[s]["peak_rss_mib"] for s in ("grit_jax", "reference")]
    rag_rss = out["peak_rss_mib"]["rag"]
    rss += [rag_rss[s][k] for s in ("grit_jax", "reference") for k in ("index", "all")]
    assert all(r > 50 for r in rss), rss  # each side's own process: a library and a model
    assert all(rag_rss[s]["index"] <= rag_rss[s]["all"] for s in ("grit_jax", "reference"))

    enc = bench.result("encode_speed_quick")
    assert enc["embeddings_max_abs_diff"] <= 1e-5 and enc["grit_jax"]["texts_per_s"] > 0

    rag = bench.result("rag_latency_quick")
    assert all(cell["same_tokens"] for key, cell in rag["results"].items()
               if "-" not in key.split("/")[1])  # joined caches differ by design

    for name in ("train_step_speed_quick", "train_step_speed_2048_quick"):
        step = bench.result(name)
        first = {k: abs(step["losses"]["grit_jax"][0][k] - step["losses"]["reference"][0][k])
                 / step["losses"]["reference"][0][k] for k in ("loss", "loss_rep", "loss_gen")}
        assert max(first.values()) <= 1e-5, first  # same weights and batch: the same step
        assert step["losses_max_rel_diff"] <= 1e-3  # after one AdamW update on each side
        for side in ("grit_jax", "reference"):
            assert step[side]["step_s"] > 0 and 0 < step[side]["mfu_vs_measured_peak"]


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
