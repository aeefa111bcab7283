"""How the train step's cost grows with tokens: sequence length 512-4096 and batch size, grit_jax
and the PyTorch reference step on the same weights and batches.

Each point is one unified GRIT step over n queries, n passages and n generative samples of L
tokens each (3nL tokens); medians over repeats after a warm-up, per side. Matmul work grows
linearly with tokens and attention with n L^2, so time per token should stay flat with batch
and rise with length only by the attention share.

Prints one JSON object and writes benchmarks/results/scaling.json.
Usage: python benchmarks/scaling.py [--shape m19] [--lengths 512,1024,2048,4096] [--batches 1,2,4,8]
"""

import argparse
import tempfile

import peers
from timing import median_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m19", choices=sorted(peers.SHAPES))
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="at batch 1")
    parser.add_argument("--batches", default="1,2,4,8", help="at the first length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args(argv)

    from grit_jax.trainer import step_flops

    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    points = [(1, L) for L in lengths] + [(n, lengths[0]) for n in batches if n != 1]
    kw = dict(lr=1e-5, total_steps=1000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        ref = peers.TorchGritStep(tmp, **kw)
        for n, L in points:
            batch = peers.grit_batch(n, 1, n, L, L, L)
            ref_s = median_seconds(lambda: ref(batch), args.repeats)
            ours = peers.JaxGritStep(tmp, batch=batch, **kw)  # one compile per shape
            our_s = median_seconds(lambda: ours(batch), args.repeats)
            tokens = 3 * n * L
            rows.append({"batch": n, "length": L, "tokens": tokens,
                         "model_tflop": round(step_flops(ours.config, batch, ours.lc) / 1e12, 3),
                         "grit_jax_s": round(our_s, 3), "reference_s": round(ref_s, 3),
                         "grit_jax_ms_per_token": round(1e3 * our_s / tokens, 3),
                         "reference_ms_per_token": round(1e3 * ref_s / tokens, 3),
                         "speedup_vs_reference": round(ref_s / our_s, 2)})
            print(rows[-1], flush=True)
            ours = None  # one model at a time
    return peers.write_result(args.name, {"machine": peers.machine(), "shape": args.shape,
                                          "points": rows})


if __name__ == "__main__":
    main()
