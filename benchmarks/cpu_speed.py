"""Every CPU speed ratio against the references in one run, with the machine they were measured on.

Runs the side-by-side benchmarks one after the other (each writes its own JSON as usual) and
prints one table: the machine (CPU model, widest vector ISA, cores, library versions), the
float32 matmul peaks of XLA and torch measured here, and grit_jax's speed relative to each
reference with its correctness check (same tokens, embeddings, losses). Refreshes the README's
Performance table anywhere in one command (~25 min on 2 cores at the default sizes).

Prints one JSON object and writes benchmarks/results/cpu_speed.json.
Usage: python benchmarks/cpu_speed.py [--quick]   (--quick: tiny models, a smoke run)
"""

import argparse

import encode_speed
import generate_speed
import peers
import rag_latency
import train_step_speed

SIZES = {  # benchmark -> (default arguments, --quick arguments)
    "generate": (["--shape", "m283"], ["--shape", "m5", "--new-tokens", "8", "--repeats", "1"]),
    "encode": (["--shape", "m283"], ["--shape", "m5", "--texts", "4", "--words", "30",
                                     "--batch-size", "2", "--repeats", "1"]),
    "rag": (["--shape", "m19"], ["--shape", "m5", "--doc-tokens", "200", "--repeats", "1"]),
    "train_step": (["--shape", "m283"], ["--shape", "m5", "--lengths", "16,24,32",
                                         "--repeats", "1"]),
    # Two queries, two passages, one generative sample, 2048 tokens each (m57: m283 would take
    # an hour on 2 cores).
    "train_step_2048": (["--shape", "m57", "--queries", "2", "--passages-per-query", "1",
                         "--gen", "1", "--lengths", "2048,2048,2048"],
                        ["--shape", "m5", "--queries", "2", "--passages-per-query", "1",
                         "--gen", "1", "--lengths", "64,64,64", "--repeats", "1"]),
}


def summarise(results):
    """One row per measured ratio: (what, speed vs reference, same result?)."""
    gen, enc, rag = results["generate"], results["encode"], results["rag"]
    rows = [
        (f"generate ({gen['shape']}, {gen['new_tokens']} tokens)", gen["speedup_vs_reference"],
         gen["same_tokens"]),
        (f"encode ({enc['shape']}, {enc['texts']} texts)", enc["speedup_vs_reference"],
         enc["embeddings_max_abs_diff"] <= 1e-5),
    ]
    for key, cell in rag["results"].items():
        # Two cached parts are joined with re-rotated positions and one BOS, where the reference
        # keeps each part's own positions: different tokens by design (README, RAG caching).
        rows.append((f"RAG {key} ({rag['shape']})", cell["speedup_vs_reference"],
                     None if "-" in key.split("/")[1] else cell["same_tokens"]))
    for name in ("train_step", "train_step_2048"):
        step = results[name]
        rows.append((f"train step ({step['shape']}, lengths {step['batch']['lengths']}; MFU "
                     f"{step['grit_jax']['mfu_vs_measured_peak']:.0%} vs "
                     f"{step['reference']['mfu_vs_measured_peak']:.0%})",
                     step["speedup_vs_reference"], step["losses_max_rel_diff"] <= 1e-3))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--name", default="cpu_speed")
    args = parser.parse_args(argv)

    pick = 1 if args.quick else 0
    suffix = "_quick" if args.quick else ""
    runs = {"generate": (generate_speed, "generate_speed"),  # name: (script, its result file)
            "encode": (encode_speed, "encode_speed"), "rag": (rag_latency, "rag_latency"),
            "train_step": (train_step_speed, "train_step_speed"),
            "train_step_2048": (train_step_speed, "train_step_speed_2048")}
    results = {name: module.main(SIZES[name][pick] + ["--name", result + suffix])
               for name, (module, result) in runs.items()}
    peak = peers.matmul_peak()
    rows = summarise(results)
    table = [{"benchmark": what, "speedup_vs_reference": ratio, "same_result": same}
             for what, ratio, same in rows]
    summary = {
        "machine": peers.machine(),
        "matmul_peak_gflops": {"jax": round(peak["jax_flops_per_s"] / 1e9, 1),
                               "torch": round(peak["torch_flops_per_s"] / 1e9, 1)},
        "ratios": table,
        "peak_rss_mib": {"generate": {s: results["generate"][s]["peak_rss_mib"]
                                      for s in ("grit_jax", "reference")},
                         "rag": results["rag"]["peak_rss_mib"]},
    }
    out = peers.write_result(args.name + suffix, summary)
    print(f"\n{summary['machine']}\nmatmul peak (float32, 2048^3): jax "
          f"{summary['matmul_peak_gflops']['jax']} GFLOP/s, torch "
          f"{summary['matmul_peak_gflops']['torch']} GFLOP/s")
    labels = {True: "same", False: "DIFFERENT", None: "n/a"}
    for what, ratio, same in rows:
        print(f"  {ratio:5.2f}x  {labels[same]:9s}  {what}")
    return out


if __name__ == "__main__":
    main()
