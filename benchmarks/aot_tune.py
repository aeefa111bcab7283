"""Tune a config's memory/speed knobs for a TPU topology by ahead-of-time compilation.

    python benchmarks/aot_tune.py --config configs/gritlm_7b.py --topology v5p:4x4x4 \
        [--slices 1] [--out benchmarks/results/aot/tune_gritlm_7b_v5p-128.json]

One coordinate sweep over the remat policy, the GradCache chunk and the LM-head chunk: each knob
in turn takes the value whose compiled step (``grit_jax.aot.compile_step``: the real step, the
TPU compiler's memory analysis, the loop-aware cost model) is fastest among those that fit with
the headroom ``grit_jax.aot.HEADROOM`` leaves (10% of HBM), the others held. Every candidate is
recorded with its estimated step time, implied MFU and per-device memory. Needs libtpu (make
venv installs it); one compile of the 7B step takes 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grit_jax import aot  # noqa: E402  (finds libtpu before JAX starts its backends)

REMAT = ("full", "save_qkv_proj", "save_dot_except_mlp", "save_dot_except_mlpwi", "minimal",
         "minimal_offloaded")
LOGITS_CHUNKS = (1024, 4096)


def load(config_arg: str):
    path, _, arg = config_arg.partition(":")
    module = importlib.import_module(path.replace("/", ".").removesuffix(".py"))
    return module.get_config(arg) if arg else module.get_config()


def gradcache_chunks(config, data_parallel: int) -> list[int]:
    """0 (off) and the chunk sizes that split both the queries and the passages evenly over
    the data-parallel devices: 1, 2, 4 ... 32 sequences per device."""
    q = int(config.data.query_batch)
    if config.loss.mode == "generative":
        return []
    return [0] + [data_parallel * k for k in (1, 2, 4, 8, 16, 32)
                  if data_parallel * k <= q and q % (data_parallel * k) == 0]


def summary(report) -> dict:
    keep = {k: report.get(k) for k in ("remat_policy", "grad_cache_chunk", "logits_chunk",
                                       "fits", "headroom", "hlo_flops_over_model")}
    if "compiler_error" in report:
        return dict(keep, fits=False, error=report["compiler_error"][:200])
    return dict(keep, step_s=report["estimated_step_s"]["overlapped"],
                mfu=report["implied_mfu"]["overlapped"],
                gib=report["per_device_gib"]["total"],
                setup_gib=max(report["setup_per_device_gib"].values()))


def evaluate(config, topology, lengths, slices, knobs, seen):
    key = json.dumps(knobs, sort_keys=True)
    if key in seen:
        return seen[key]
    c = copy.deepcopy(config)
    c.model.remat_policy = knobs["remat_policy"]
    c.loss.grad_cache_chunk = knobs["grad_cache_chunk"]
    c.loss.logits_chunk = knobs["logits_chunk"]
    t0 = time.time()
    try:
        _, report = aot.compile_step(c, topology, lengths, slices)
        row = summary(report)
        seen[key] = (row, report)
    except ValueError as e:  # a combination the config checks refuse
        row, report = dict(knobs, fits=False, error=str(e)[:200]), None
        seen[key] = (row, None)
    row["compile_s"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
    return seen[key]


def better(a, b) -> bool:
    """Whether candidate row a beats b: fitting first, then the estimated step time."""
    if b is None or not b.get("fits"):
        return bool(a.get("fits")) or b is None
    return bool(a.get("fits")) and a["step_s"] < b["step_s"]


def tune(config, topology, lengths, slices, remat=REMAT, chunks=None, logits=LOGITS_CHUNKS):
    from grit_jax import sharding, trainer

    dp = sharding.batch_shards(trainer.mesh(config, aot.topology_devices(topology, slices)))
    best = {"remat_policy": config.model.remat_policy,
            "grad_cache_chunk": int(config.loss.grad_cache_chunk),
            "logits_chunk": int(config.loss.logits_chunk)}
    seen = {}
    best_row, _ = evaluate(config, topology, lengths, slices, best, seen)
    space = {"remat_policy": remat,
             "grad_cache_chunk": gradcache_chunks(config, dp) if chunks is None else chunks,
             "logits_chunk": logits}
    for knob, values in space.items():  # one sweep: each knob in turn, the others held
        for v in values:
            trial = dict(best, **{knob: v})
            row, _ = evaluate(config, topology, lengths, slices, trial, seen)
            if better(row, best_row):
                best, best_row = trial, row
    return best, best_row, [r for r, _ in seen.values()], seen[json.dumps(best, sort_keys=True)][1]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/x.py or configs/x.py:ARG")
    p.add_argument("--topology", required=True)
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--lengths", default="256,2048,2048")
    p.add_argument("--out", default=None)
    p.add_argument("--remat", default=",".join(REMAT), help="policies to try, comma-separated")
    p.add_argument("--grad-cache-chunks", default=None,
                   help="GradCache chunks to try (default: 0 and every even split)")
    p.add_argument("--logits-chunks", default=",".join(map(str, LOGITS_CHUNKS)))
    args = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    try:
        config = load(args.config)
    except (ValueError, ImportError, FileNotFoundError) as e:
        p.error(str(e) if args.config in str(e) else f"--config {args.config}: {e}")
    lengths = tuple(int(x) for x in args.lengths.split(","))
    best, row, rows, report = tune(
        config, args.topology, lengths, args.slices, remat=args.remat.split(","),
        chunks=None if args.grad_cache_chunks is None else ints(args.grad_cache_chunks),
        logits=ints(args.logits_chunks))
    print("best:", json.dumps(best), json.dumps(row))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "topology": args.topology, "slices": args.slices,
                       "lengths": lengths, "best": best, "best_row": row, "candidates": rows,
                       "best_report": report}, f, indent=1)
        # The winner's full report, as `python -m grit_jax.aot --json` writes it.
        name = os.path.basename(args.config.partition(":")[0]).removesuffix(".py")
        best_path = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                 f"{name}_{args.topology.replace(':', '_')}.json")
        with open(best_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
