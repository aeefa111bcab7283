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


def run_ours(model_dir, prompts, new_tokens, batch, repeats):
    """grit_jax's generated ids and median seconds."""
    from grit_jax.inference import GritLM

    ours = GritLM.from_pretrained(model_dir)
    run = lambda: ours.generate_tokens(prompts, max_new_tokens=new_tokens,  # noqa: E731
                                       stop_at_eos=False, batch_size=batch)
    return run(), median_seconds(run, repeats)


def run_reference(model_dir, prompts, new_tokens, repeats):
    """transformers' generated ids and median seconds."""
    import torch
    from transformers import MistralForCausalLM

    ref = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return run(), median_seconds(run, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m283", choices=sorted(peers.SHAPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="generate_speed")
    args = parser.parse_args(argv)

    from grit_jax.convert.hf import read_hf_config
    from grit_jax.data import formats
    from grit_jax.data.tokenizers import default_tokenizer

    tok = default_tokenizer()
    texts = peers.wiki_passages(args.batch, args.prompt_words)
    prompts = [formats.encode_chat(tok, "Summarise: " + t, add_generation_prompt=True).ids.tolist()
               for t in texts]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts of one batch must have equal lengths here (no padding)")
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        # Each side in its own process: its time, and its peak memory alone.
        (our_tokens, our_s), our_rss = peers.in_fresh_process(
            run_ours, tmp, prompts, n, args.batch, args.repeats)
        (ref_tokens, ref_s), ref_rss = peers.in_fresh_process(
            run_reference, tmp, prompts, n, args.repeats)
        params = read_hf_config(tmp).num_params()
    new = n * args.batch
    shape = peers.SHAPES[args.shape]
    result = {
        "machine": peers.machine(), "shape": args.shape, "params": params, "batch": args.batch,
        "prompt_tokens": len(prompts[0]), "new_tokens": n,
        "same_tokens": our_tokens == ref_tokens,
        "grit_jax": {"seconds": round(our_s, 3), "new_tokens_per_s": round(new / our_s, 1),
                     "peak_rss_mib": our_rss},
        "reference": {"seconds": round(ref_s, 3), "new_tokens_per_s": round(new / ref_s, 1),
                      "peak_rss_mib": ref_rss},
        "speedup_vs_reference": round(ref_s / our_s, 2),
        "matvec": [matvec_bandwidth(shape["hidden_size"], shape["intermediate_size"]),
                   matvec_bandwidth(shape["hidden_size"], shape["vocab_size"])],
    }
    return peers.write_result(args.name, result)


if __name__ == "__main__":
    main()
