"""Generation speed: grit_jax GritLM.generate_tokens vs transformers generate, same weights.

Greedy decoding of the same prompt (a GRIT chat turn around real Wikipedia text) for exactly
``--new-tokens`` tokens (EOS does not stop either side), batch 1 by default; the generated token
ids are compared and each side's time is the median over repeats after a warm-up.

Prints one JSON object and writes benchmarks/results/generate_speed.json.
Usage: python benchmarks/generate_speed.py [--shape m283] [--new-tokens 128]
"""

import argparse
import tempfile

import peers
from timing import median_seconds


def matvec_bandwidth(rows, cols, repeats=20):
    """GB/s of one (1, rows) x (rows, cols) float32 product, jnp (XLA) and torch: batch-1
    decoding is a chain of these, bound by how fast the weights are read."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.RandomState(0)
    x, w = rng.randn(1, rows).astype(np.float32), rng.randn(rows, cols).astype(np.float32)
    jx, jw, mv = jnp.asarray(x), jnp.asarray(w), jax.jit(jnp.matmul)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    gb = w.nbytes / 1e9
    return {"matrix": [rows, cols],
            "grit_jax_gb_per_s": round(gb / median_seconds(lambda: mv(jx, jw).block_until_ready(),
                                                           repeats), 1),
            "reference_gb_per_s": round(gb / median_seconds(lambda: tx @ tw, repeats), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m283", choices=sorted(peers.SHAPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="generate_speed")
    args = parser.parse_args(argv)

    import torch
    from transformers import MistralForCausalLM

    from grit_jax.data import formats
    from grit_jax.inference import GritLM

    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        ours = GritLM.from_pretrained(tmp)
        texts = peers.wiki_passages(args.batch, args.prompt_words)
        prompts = [formats.encode_chat(ours.tokenizer, "Summarise: " + t,
                                       add_generation_prompt=True).ids.tolist() for t in texts]
        n = args.new_tokens
        our_run = lambda: ours.generate_tokens(prompts, max_new_tokens=n,  # noqa: E731
                                               stop_at_eos=False, batch_size=args.batch)
        our_tokens = our_run()
        our_s = median_seconds(our_run, args.repeats)
        params = ours.config.num_params()
        ours = None  # free the JAX model before the torch side runs

        ref = MistralForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one batch must have equal lengths here (no padding)")
        ids = torch.tensor(prompts)

        def ref_run():
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()

        ref_tokens = ref_run()
        ref_s = median_seconds(ref_run, args.repeats)
    new = n * args.batch
    shape = peers.SHAPES[args.shape]
    result = {
        "machine": peers.machine(), "shape": args.shape, "params": params, "batch": args.batch,
        "prompt_tokens": len(prompts[0]), "new_tokens": n,
        "same_tokens": our_tokens == ref_tokens,
        "grit_jax": {"seconds": round(our_s, 3), "new_tokens_per_s": round(new / our_s, 1)},
        "reference": {"seconds": round(ref_s, 3), "new_tokens_per_s": round(new / ref_s, 1)},
        "speedup_vs_reference": round(ref_s / our_s, 2),
        "matvec": [matvec_bandwidth(shape["hidden_size"], shape["intermediate_size"]),
                   matvec_bandwidth(shape["hidden_size"], shape["vocab_size"])],
    }
    return peers.write_result(args.name, result)


if __name__ == "__main__":
    main()
