"""Unified GRIT train step: grit_jax vs the reference step in PyTorch, same weights and batch.

Both sides load one random Mistral-architecture model (default ~283M parameters, float32), take
the same GRIT batch (queries, passages, generative samples) and run the full update (both
losses, backward, clipping, AdamW). The first two steps' losses are compared (the two sides
compute the same step), then each side's step time is the median over repeats after a warm-up.
Model FLOPs (6 x matmul parameters x tokens + attention + the LM head on generative tokens,
grit_jax.trainer.step_flops) give tokens/s and MFU against this machine's float32 matmul peak,
measured in the same run.

Prints one JSON object and writes benchmarks/results/train_step_speed.json.
Usage: python benchmarks/train_step_speed.py [--shape m283] [--repeats 3]
"""

import argparse
import tempfile

import peers
from timing import median_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m283", choices=sorted(peers.SHAPES))
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--passages-per-query", type=int, default=2)
    parser.add_argument("--gen", type=int, default=4)
    parser.add_argument("--lengths", default="64,128,256", help="query,passage,generative tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="train_step_speed")
    args = parser.parse_args(argv)

    from grit_jax.trainer import step_flops

    q_len, p_len, g_len = (int(x) for x in args.lengths.split(","))
    batch = peers.grit_batch(args.queries, args.passages_per_query, args.gen, q_len, p_len, g_len)
    tokens = sum(int(batch[f"{p}_valid"].sum()) for p in ("query", "passage", "gen"))
    peak = peers.matmul_peak()
    kw = dict(lr=1e-5, total_steps=1000)
    times, losses = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        for side, make in (("reference", lambda: peers.TorchGritStep(tmp, **kw)),
                           ("grit_jax", lambda: peers.JaxGritStep(tmp, batch=batch, **kw))):
            step = make()
            losses[side] = [step(batch) for _ in range(2)]
            times[side] = median_seconds(lambda: step(batch), args.repeats)
            if side == "grit_jax":
                config, lc = step.config, step.lc
            step = None  # one side in memory at a time
    flops = step_flops(config, batch, lc)
    result = {
        "machine": peers.machine(), "shape": args.shape, "params": config.num_params(),
        "batch": {"queries": args.queries, "passages": args.queries * args.passages_per_query,
                  "generative": args.gen, "lengths": [q_len, p_len, g_len], "tokens": tokens},
        "matmul_peak_gflops": round(peak["peak_flops_per_s"] / 1e9, 1),
        "matmul_peak": {k: round(v / 1e9, 1) if k != "n" else v for k, v in peak.items()},
        "model_tflop_per_step": round(flops / 1e12, 3),
        "losses_max_rel_diff": peers.max_rel_diff(losses["grit_jax"], losses["reference"]),
        "losses": losses,
    }
    for side in ("grit_jax", "reference"):
        result[side] = {"step_s": round(times[side], 3),
                        "tokens_per_s": round(tokens / times[side], 1),
                        "mfu_vs_measured_peak": round(
                            flops / times[side] / peak["peak_flops_per_s"], 3)}
    result["speedup_vs_reference"] = round(times["reference"] / times["grit_jax"], 2)
    return peers.write_result(args.name, result)


if __name__ == "__main__":
    main()
