"""``make demo``: train GRIT on real Wikipedia text, then embed, generate and export the result.

1. Builds the demo set from the Wikipedia pages in gensim's test data (train + held-out eval).
2. Trains ``configs/tiny.py`` (a small Mistral-architecture model, real Mistral tokenizer) with the
   mixed contrastive + next-token loss; prints the losses and plots them to ``OUT/losses.png``.
3. Retrieval on held-out articles: top-1 accuracy of the trained model vs its random init.
4. Generates a reply with the KV cache.
5. Exports the workdir to Hugging Face format, reloads it with transformers and the official
   gritlm package and prints the parity figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time

import numpy as np


def load_tiny_config(path: str = "configs/tiny.py"):
    """configs/tiny.py's get_config() (run from the repository root)."""
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def plot_losses(metrics_path: str, png: str) -> None:
    """Both losses against the step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    steps = sorted(rows)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for a, key, title in ((ax[0], "loss_rep", "contrastive (embedding)"),
                          (ax[1], "loss_gen", "next-token (generation)")):
        a.plot(steps, [rows[s][key] for s in steps])
        a.set_title(title)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def retrieval_accuracy(model, jsonl: str, limit: int = 64) -> float:
    """Top-1 title -> passage retrieval accuracy over (up to ``limit``) articles of a file."""
    with open(jsonl) as f:
        recs = [json.loads(line) for line in f][:limit]
    instruction = recs[0]["query"][0]
    q = model.encode_queries([r["query"][1] for r in recs], instruction=instruction)
    d = model.encode_corpus([r["pos"][0] for r in recs])
    return float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(recs))))


def export_and_compare(workdir: str, out: str, model) -> None:
    """Export the trained workdir to Hugging Face format; compare logits and embeddings."""
    from grit_jax.convert import hf
    from grit_jax.model import forward, logits_fn

    print("\n== Export the workdir to Hugging Face format and reload it")
    hf_dir = os.path.join(out, "hf")
    hf.grit_to_hf(workdir, hf_dir, overwrite=True)  # the demo's own folder, remade each run
    print(f"wrote {sorted(os.listdir(hf_dir))}")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()  # the load reports are noise here
        transformers.logging.disable_progress_bar()
    except ImportError:
        print("transformers/torch not installed: skipping the reload (pip install -e '.[hf]')")
        return
    from grit_jax.data import formats

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    texts = ["Paris is the capital of France.", "Anarchism is a political philosophy.", "Hi"]
    enc = [formats.encode_embed(model.tokenizer, t) for t in texts]
    ids, valid, _ = formats.pad_batch(enc, max(map(len, enc)), model.tokenizer.pad_id)
    ours = np.asarray(logits_fn(model.params, model.config,
                                forward(model.params, model.config, ids, valid).hidden))
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
        instruction = "Given a Wikipedia article title, retrieve a passage from that article"
        ref_emb = RefGritLM(hf_dir, mode="embedding", attn="bbcc", pooling_method="mean",
                            device="cpu", dtype=torch.float32)
        want = ref_emb.encode(["Anarchism", "Albedo"],
                              instruction=f"<|user|>\n{instruction}\n<|embed|>\n")
        got = model.encode(["Anarchism", "Albedo"], instruction=instruction)
        print(f"embeddings, grit_jax vs official gritlm: max |diff| = {np.abs(got - want).max():.2e}")


def rag_demo(model, jsonl: str, index_dir: str, n_docs: int = 32) -> None:
    """Index training passages (storing their states), answer with plain RAG and doc caching."""
    from grit_jax.rag import RAG

    docs = []
    with open(jsonl) as f:
        for line in f:
            rec = json.loads(line)
            docs.append({"id": rec["query"][1], "title": rec["query"][1], "text": rec["pos"][0]})
            if len(docs) == n_docs:
                break
    t = time.perf_counter()
    # Queries are article titles with the instruction the model was trained with.
    rag = RAG.build(model, docs, index_dir, overwrite=True,  # the demo's own, remade each run
                    query_instruction="Given a Wikipedia article title, retrieve a passage from "
                                      "that article")
    print(f"indexed {len(docs)} passages with their key/value states in "
          f"{time.perf_counter() - t:.1f}s -> {index_dir}")
    query = docs[0]["title"]
    for cache in (None, "doc"):
        rag.answer(query, cache=cache, max_new_tokens=24)  # compile
        t = time.perf_counter()
        a = rag.answer(query, cache=cache, max_new_tokens=24)
        dt = time.perf_counter() - t
        print(f"[{cache or 'plain RAG'}] {query!r} retrieved {rag.docs[a.doc_ids[0]]['title']!r} "
              f"(score {a.scores[0]:.2f}); read {a.prompt_tokens} prompt tokens, reused "
              f"{a.cached_tokens} cached, {dt * 1000:.0f} ms -> {a.text!r}")


_MARK = ".grit_jax_demo"


def _claim_out(out: str) -> None:
    """Mark OUT as the demo's folder; refuse a non-empty folder the demo did not make."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, _MARK)):
        raise ValueError(f"--out {out}: exists and was not made by the demo, which remakes its "
                         "train/, hf/ and index/; choose a new or empty folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, _MARK), "w").close()


def main(argv=None) -> int:
    from grit_jax import cli

    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_jax.demo", description=__doc__)
    parser.add_argument("--out", default="demo_out",
                        help="the demo's own folder: its train/, hf/ and index/ are remade on each "
                             "run, its data/ reused")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    parser.add_argument("--config", default="configs/tiny.py")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps {args.steps}: must be > 0")
    _claim_out(args.out)

    import jax

    from grit_jax import train
    from grit_jax.inference import GritLM
    from grit_jax.model import init_params

    t0 = time.time()
    print(f"== grit_jax demo on {jax.device_count()} {jax.default_backend()} device(s)")
    config = load_tiny_config(args.config)
    if args.steps:
        config.total_steps = args.steps
        config.checkpoint_every = max(args.steps, 1)
    workdir = os.path.join(args.out, "train")
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time (the data is reused)

    # -------------------------------------------------------------------------------------------
    print("\n== Training data from real Wikipedia pages (gensim's test data, CC BY-SA)")
    data_dir = train.resolve_data_dir(config, args.out)  # builds OUT/data/{train,eval} on first use
    config.data.data_dir = data_dir
    print(f"-> {os.path.dirname(data_dir)}")

    # -------------------------------------------------------------------------------------------
    print(f"\n== Training {args.config} for {config.total_steps} steps (loss = rep + gen)")
    logged = train.train(config, workdir)
    png = os.path.join(args.out, "losses.png")
    plot_losses(os.path.join(workdir, "metrics.jsonl"), png)
    if logged:
        first, last = logged[0], logged[-1]
        print(f"loss_rep {first['loss_rep']:.3f} -> {last['loss_rep']:.3f}, loss_gen "
              f"{first['loss_gen']:.3f} -> {last['loss_gen']:.3f} (steps {first['step']} -> "
              f"{last['step']}); plot: {png}")

    # -------------------------------------------------------------------------------------------
    print("\n== Retrieval, title -> passage, top-1 (a model trained from scratch for minutes: the "
          "training articles show learning, the held-out ones need a pretrained start)")
    model = GritLM.from_pretrained(workdir, attn="bbcc", pooling_method="mean")
    untrained = GritLM(init_params(model.config, seed=config.seed), model.config, model.tokenizer)
    for split in ("train", "eval"):
        path = os.path.join(args.out, "data", "jsonl", split, "wiki_title_to_passage.jsonl")
        n = min(64, sum(1 for _ in open(path)))
        print(f"{split} articles ({n}, chance {1 / n:.2f}): trained "
              f"{retrieval_accuracy(model, path):.2f}, random init "
              f"{retrieval_accuracy(untrained, path):.2f}")
    one = model.encode("Anarchism", instruction="Given a Wikipedia article title, retrieve a "
                                                "passage from that article")
    batch = model.encode(["Anarchism", "Albedo", "A"], instruction="Given a Wikipedia article "
                                                                   "title, retrieve a passage "
                                                                   "from that article")
    print(f"same embedding alone vs in a batch: max |diff| = {np.abs(one - batch[0]).max():.1e}")

    # -------------------------------------------------------------------------------------------
    print("\n== Generation (causal attention, static KV cache, greedy)")
    for prompt in ("Tell me about Anarchism.", "What is the first sentence of the Wikipedia "
                                               "article on Albedo?"):
        print(f"{prompt!r} -> {model.generate(prompt, max_new_tokens=32)!r}")

    # -------------------------------------------------------------------------------------------
    export_and_compare(workdir, args.out, model)

    # -------------------------------------------------------------------------------------------
    print("\n== RAG with doc caching: the passages' key/value states come from indexing them")
    rag_demo(model, os.path.join(args.out, "data", "jsonl", "train", "wiki_title_to_passage.jsonl"),
             os.path.join(args.out, "rag_index"))
    print(f"\ndemo finished in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
