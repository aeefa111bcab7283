"""``make demo``: one model embeds and generates, then round-trips through Hugging Face format.

Builds a small randomly initialised Mistral-architecture model with the real Mistral tokenizer,
saves it as an Orbax params checkpoint, embeds instructed queries and documents
(bidirectional attention, instruction-masked mean pooling), generates a chat reply (causal,
KV-cached), exports to Hugging Face safetensors, reloads that with transformers (and the
official gritlm package when installed) and prints the parity figures. The weights are random
until training lands, so rankings and replies are not meaningful yet; the numerics are.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_jax.demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="working directory for the demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from grit_jax import checkpoint
    from grit_jax.config import tiny_config
    from grit_jax.convert import hf
    from grit_jax.data import formats
    from grit_jax.data.tokenizers import default_tokenizer
    from grit_jax.inference import GritLM
    from grit_jax.model import forward, init_params, logits_fn

    t0 = time.time()
    print(f"== grit_jax demo on {jax.device_count()} {jax.default_backend()} device(s)")
    config = tiny_config(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                         num_kv_heads=4, rope_theta=10000.0)
    params_dir = os.path.join(args.out, "params")
    params = init_params(config, seed=args.seed)
    checkpoint.save_params(params_dir, params, config)
    default_tokenizer().save(params_dir)
    print(f"model: {config.family}, {config.num_params() / 1e6:.1f}M params (random init) "
          f"-> {params_dir}")

    # -------------------------------------------------------------------------------------------
    print("\n== Embedding (bidirectional attention, mean pooling over text tokens only)")
    model = GritLM.from_pretrained(params_dir, attn="bbcc", pooling_method="mean")
    instruction = "Given a question, retrieve Wikipedia passages that answer it"
    queries = ["What is the capital of France?", "How do vaccines work?"]
    docs = ["Paris is the capital and most populous city of France.",
            "A vaccine trains the immune system to recognise a pathogen.",
            "The Great Barrier Reef is the world's largest coral reef system."]
    q = model.encode_queries(queries, instruction=instruction)
    d = model.encode_corpus([{"text": t} for t in docs])
    sims = q @ d.T
    print(f"query embeddings {q.shape}, document embeddings {d.shape}, float32, L2-normalised")
    for i, query in enumerate(queries):
        print(f"  {query!r}: cosine to docs = [{', '.join(f'{x:.4f}' for x in sims[i])}]")
    alone = model.encode(queries[0], instruction=instruction)
    print(f"same embedding alone vs in a batch: max |diff| = {np.abs(alone - q[0]).max():.1e}")
    causal = GritLM.from_pretrained(params_dir, attn="cccc").encode_queries(
        queries, instruction=instruction)
    print(f"bidirectional vs causal embeddings differ by {np.abs(causal - q).max():.3f} (max)")

    # -------------------------------------------------------------------------------------------
    print("\n== Generation (causal attention, static KV cache, greedy)")
    reply = model.generate("What is the capital of France?", max_new_tokens=16)
    print(f"reply (random weights, so not meaningful yet): {reply!r}")

    # -------------------------------------------------------------------------------------------
    print("\n== Training data from real Wikipedia pages (gensim's test data, CC BY-SA)")
    try:
        from grit_jax.data import wiki_demo
        from grit_jax.data.dataset import open_dataset
        from grit_jax.data.pipeline import GritBatches, PipelineConfig

        dirs = wiki_demo.make_demo_data(os.path.join(args.out, "data"),
                                        max_lengths={"query": 64, "passage": 256,
                                                     "generative": 256})
    except FileNotFoundError as e:
        print(f"skipped: {e}")
    else:
        for split, d in dirs.items():
            meta = open_dataset(d)[1]
            print(f"{split}: " + ", ".join(f"{n} ({v['kind']}, {v['examples']})"
                                           for n, v in meta["datasets"].items()))
        batches = GritBatches(PipelineConfig(dirs["train"], query_batch=8, generative_batch=8))
        print(batches.summary())
        first = batches.local_batch(0)
        print("step 0: " + ", ".join(f"{k} {v.shape}" for k, v in first.items()
                                     if k.endswith("_ids")))
        tok = model.tokenizer
        first_query = first["query_ids"][0][first["query_valid"][0]]
        print(f"first query: {tok.decode(first_query)!r}")

    # -------------------------------------------------------------------------------------------
    print("\n== Export to Hugging Face format and reload with transformers")
    hf_dir = os.path.join(args.out, "hf")
    hf.grit_to_hf(params_dir, hf_dir)
    print(f"wrote {sorted(os.listdir(hf_dir))}")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()  # the load reports are noise here
        transformers.logging.disable_progress_bar()
    except ImportError:
        print("transformers/torch not installed: skipping the reload (pip install -e '.[hf]')")
        return 0
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    enc = [formats.encode_embed(model.tokenizer, t) for t in docs]
    ids, valid, _ = formats.pad_batch(enc, max(map(len, enc)), model.tokenizer.pad_id)
    ours = np.asarray(logits_fn(model.params, config, forward(model.params, config, ids, valid).hidden))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids.astype(np.int64)),
                     attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
    print(f"logits, grit_jax vs transformers (padded batch, float32): "
          f"max |diff| = {np.abs(ours - theirs)[valid].max():.2e}")
    try:
        from gritlm import GritLM as RefGritLM
    except ImportError:
        print("gritlm not installed: skipping the embedding comparison")
    else:
        ref_emb = RefGritLM(hf_dir, mode="embedding", attn="bbcc", pooling_method="mean",
                            device="cpu", dtype=torch.float32)
        want = ref_emb.encode(queries, instruction=f"<|user|>\n{instruction}\n<|embed|>\n")
        print(f"embeddings, grit_jax vs official gritlm: max |diff| = {np.abs(q - want).max():.2e}")
    print(f"\ndemo finished in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
