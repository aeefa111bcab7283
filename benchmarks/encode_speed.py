"""Encode throughput: grit_jax GritLM.encode vs the official gritlm.GritLM.encode, same weights.

Both sides embed the same real Wikipedia passages (the demo pages, cut to a few hundred tokens)
with the same instruction, bidirectional attention and mean pooling, in batches of the same
size; the embeddings are compared and each side's time is the median over repeats after a
warm-up (compilation included in the warm-up only).

Prints one JSON object and writes benchmarks/results/encode_speed.json.
Usage: python benchmarks/encode_speed.py [--shape m283] [--texts 32] [--batch-size 16]
"""

import argparse
import tempfile

import numpy as np

import peers
from timing import median_seconds

INSTRUCTION = "Given a question, retrieve passages that answer it"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m283", choices=sorted(peers.SHAPES))
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--words", type=int, default=160,
                        help="words per passage (~1.4 tokens each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="encode_speed")
    args = parser.parse_args(argv)

    import torch
    from gritlm import GritLM as RefGritLM

    from grit_jax.inference import GritLM

    texts = peers.wiki_passages(args.texts, args.words)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        ref = RefGritLM(tmp, mode="embedding", pooling_method="mean", attn="bbcc", device="cpu",
                        dtype=torch.float32)
        ref_instruction = "<|user|>\n" + INSTRUCTION + "\n<|embed|>\n"  # the reference README's
        ref_run = lambda: ref.encode(texts, instruction=ref_instruction, **kw)  # noqa: E731
        ref_emb = ref_run()
        ref_s = median_seconds(ref_run, args.repeats)
        ref = None  # free the torch model before the JAX side runs
        ours = GritLM.from_pretrained(tmp, attn="bbcc", pooling_method="mean")
        our_run = lambda: ours.encode(texts, instruction=INSTRUCTION, **kw)  # noqa: E731
        our_emb = our_run()
        our_s = median_seconds(our_run, args.repeats)
        lengths = [len(e) for e in ours.tokenize_for_embedding(texts, INSTRUCTION, args.max_length)]
        params = ours.config.num_params()
    tokens = int(sum(lengths))
    result = {
        "machine": peers.machine(), "shape": args.shape, "params": params,
        "texts": args.texts, "batch_size": args.batch_size, "tokens": tokens,
        "tokens_per_text": [min(lengths), int(np.median(lengths)), max(lengths)],
        "embeddings_max_abs_diff": float(np.abs(our_emb - ref_emb).max()),
        "grit_jax": {"seconds": round(our_s, 3), "texts_per_s": round(args.texts / our_s, 2),
                     "tokens_per_s": round(tokens / our_s, 1)},
        "reference": {"seconds": round(ref_s, 3), "texts_per_s": round(args.texts / ref_s, 2),
                      "tokens_per_s": round(tokens / ref_s, 1)},
        "speedup_vs_reference": round(ref_s / our_s, 2),
    }
    return peers.write_result(args.name, result)


if __name__ == "__main__":
    main()
