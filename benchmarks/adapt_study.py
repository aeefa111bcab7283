"""GRIT adaptation to unseen documents, on this CPU: SmolLM2-135M-Instruct zero-shot vs adapted
in three modes (unified GRIT, embedding-only, generative-only), from the same start, on the same
data in the same order, for the same number of optimizer steps.

    make corpus   # the Python 3.11 documentation's sources (Debian's python3.11-doc)
    python benchmarks/adapt_study.py [--steps 48] [--seeds 0] [--max-queries 300] [--out DIR]
    python benchmarks/adapt_study.py --config configs/smollm2_adapt.py:accelerator --steps 1000 \\
        --seeds 0,1,2   # on a GPU/TPU

Data: `python -m grit_jax.data adapt` on the corpus (documents held out whole for evaluation,
seed 0).
Held-out metrics: retrieval nDCG@10 and MRR@10 over every held-out passage for three tasks
(title -> opening passage, "title: heading" -> section, a sentence -> its passage), with 95%
bootstrap intervals over queries (at most --max-queries per task, a seeded subset), and the
generative loss on held-out chats. Several seeds (--seeds 0,1,2) change the adapters' init and
the data order, and the table gives each mode's mean and per-seed spread as well.

Writes benchmarks/results/adapt_study.json and .png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.grit_miniature import chatml_reply, run  # noqa: E402

MODES = {"unified": "unified", "embedding only": "embedding", "generative only": "generative"}
# `grit_jax.data adapt`'s flags per setting of configs/smollm2_adapt.py. cpu: passages of ~64 words
# in 96 tokens, 2% of the documents held out (10 documents, 735 passages: the retrieval corpus
# every query is ranked against); accelerator: ~180 words in 256 tokens, 10% held out.
ADAPT = {
    "cpu": ("--passage-words", "64", "--eval-fraction", "0.02", "--max-query-length", "48",
            "--max-passage-length", "96", "--max-generative-length", "128"),
    "accelerator": ("--passage-words", "180", "--eval-fraction", "0.1", "--max-query-length",
                    "64", "--max-passage-length", "256", "--max-generative-length", "512"),
}
EVAL_LENGTH = {"cpu": 128, "accelerator": 512}  # above training's passage length
PROMPTS = ["What is the purpose of the pathlib module?",
           "How do I read a file line by line in Python?"]


def held_out_tasks(data_dir, max_queries, seed=0, max_chats=200):
    """The adapt output's held-out tasks, each retrieval task cut to a seeded subset of queries
    (the corpus stays every held-out passage)."""
    from grit_jax.evaluation.tasks import load_tasks

    rng = np.random.default_rng(seed)
    tasks = load_tasks(f"adapted:heldout={data_dir}")
    for t in tasks:
        d = t.data
        if t.kind == "retrieval" and len(d["queries"]) > max_queries:
            keep = np.sort(rng.choice(len(d["queries"]), max_queries, replace=False))
            d["queries"] = [d["queries"][i] for i in keep]
            d["relevant"] = [d["relevant"][i] for i in keep]
        elif t.kind == "generative":
            d["samples"] = d["samples"][:max_chats]
    return tasks


def evaluate(model, tasks, max_length=128):
    from grit_jax.evaluation import evaluate_task

    out, memo = {}, {}  # the three tasks share one corpus: embedded once
    for t in tasks:
        r = evaluate_task(model, t, max_length=max_length, memo=memo)
        short = t.name.split("/")[-1]
        if t.kind == "retrieval":
            out[short] = {k: r[k] for k in ("ndcg_at_10", "ndcg_at_10_ci95", "mrr_at_10",
                                            "mrr_at_10_ci95", "queries", "documents")}
        else:
            out["chat_loss"] = r["loss"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(ROOT, "corpora", "python3.11-doc", "sources"))
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--max-queries", type=int, default=300)
    p.add_argument("--config", default="configs/smollm2_adapt.py")
    p.add_argument("--out", default="/tmp/adapt_study")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.corpus):
        raise SystemExit(f"{args.corpus}: not found; run `make corpus` first")
    seeds = [int(s) for s in args.seeds.split(",")]
    setting = args.config.partition(":")[2] or "cpu"
    if setting not in ADAPT:
        raise SystemExit(f"--config {args.config}: setting {setting!r} unknown "
                         f"({', '.join(ADAPT)})")
    eval_length = EVAL_LENGTH[setting]
    t0 = time.time()
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    from grit_jax.inference import GritLM

    from demo.smollm2 import gguf_path

    gguf = gguf_path()
    smol = os.path.join(args.out, "smollm2")
    if not os.path.isdir(smol):
        run([sys.executable, "-m", "grit_jax.convert", "gguf-to-grit", "--gguf", gguf,
             "--out", smol], os.path.join(logs, "convert.log"))
    data = os.path.join(args.out, "data")
    if not os.path.isdir(data):
        run([sys.executable, "-m", "grit_jax.data", "adapt", "--input", args.corpus, "--output",
             data, "--build", "--tokenizer", smol, *ADAPT[setting]],
            os.path.join(logs, "adapt.log"))
    with open(os.path.join(data, "adapt_report.json")) as f:
        report = json.load(f)
    tasks = held_out_tasks(data, args.max_queries)
    results = {"corpus": args.corpus, "steps": args.steps, "seeds": seeds,
               "config": args.config, "data": {k: report[k] for k in (
                   "documents", "passages", "records", "retrieval")}, "runs": {}}

    zero = GritLM.from_pretrained(smol, attn="bbcc", pooling_method="mean")
    results["runs"]["zero-shot"] = {"seeds": {"-": evaluate(zero, tasks, eval_length)}}
    results["generations"] = {"zero-shot": {q: chatml_reply(zero, q) for q in PROMPTS}}
    print("zero-shot:", results["runs"]["zero-shot"], flush=True)
    del zero
    for label, mode in MODES.items():
        runs = {}
        for seed in seeds:
            workdir = os.path.join(args.out, f"{mode}_seed{seed}")
            seconds = run([sys.executable, "-m", "grit_jax.train", "--config", args.config,
                           "--workdir", workdir, f"--config.total_steps={args.steps}",
                           f"--config.checkpoint_every={args.steps}", f"--config.seed={seed}",
                           f"--config.loss.mode={mode}", f"--config.init_from={smol}",
                           f"--config.data.data_dir={os.path.join(data, 'train')}"],
                          os.path.join(logs, f"{mode}_seed{seed}.log"))
            model = GritLM.from_pretrained(workdir, attn="bbcc", pooling_method="mean")
            runs[str(seed)] = dict(evaluate(model, tasks, eval_length),
                                   train_seconds=round(seconds))
            if seed == seeds[0]:
                results["generations"][label] = {q: chatml_reply(model, q) for q in PROMPTS}
            print(f"{label} seed {seed}: {runs[str(seed)]}", flush=True)
        results["runs"][label] = {"seeds": runs}
    results["total_seconds"] = round(time.time() - t0)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "adapt_study.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.results, "adapt_study.png"))
    print(table(results))
    print(json.dumps(results["generations"], indent=1))
    print(f"\ntotal {results['total_seconds']} s")
    return 0


def _summary(run, task, key="ndcg_at_10"):
    """(mean over seeds, [low, high] of the first seed's bootstrap interval, per-seed values)."""
    per = [r[task][key] for r in run["seeds"].values()]
    first = next(iter(run["seeds"].values()))[task][f"{key}_ci95"]
    return float(np.mean(per)), first, per


def table(results):
    tasks = [t for t in ("adapt_title", "adapt_heading", "adapt_cloze")
             if t in results["runs"]["zero-shot"]["seeds"]["-"]]
    head = " | ".join(f"{t[6:]} nDCG@10 [95% CI]" for t in tasks)
    lines = [f"| run | {head} | held-out chat loss | train s |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for name, entry in results["runs"].items():
        cells = []
        for t in tasks:
            mean, (lo, hi), per = _summary(entry, t)
            spread = f" (seeds {min(per):.3f}-{max(per):.3f})" if len(per) > 1 else ""
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]{spread}")
        loss = np.mean([r["chat_loss"] for r in entry["seeds"].values()])
        secs = [r.get("train_seconds") for r in entry["seeds"].values() if "train_seconds" in r]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss:.3f} | "
                     f"{round(np.mean(secs)) if secs else ''} |")
    return "\n".join(lines)


def plot(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("adapt_title", "adapt_heading", "adapt_cloze")
             if t in results["runs"]["zero-shot"]["seeds"]["-"]]
    names = list(results["runs"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        means, errs = [], [[], []]
        for n in names:
            mean, (lo, hi), _ = _summary(results["runs"][n], t)
            means.append(mean)
            errs[0].append(max(mean - lo, 0))
            errs[1].append(max(hi - mean, 0))
        ax[0].barh([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(names))], means,
                   width, xerr=errs, capsize=2, label=t[6:])
    ax[0].set_yticks(range(len(names)), names, fontsize=8)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("held-out nDCG@10, 95% bootstrap CI (higher is better)")
    ax[0].legend(fontsize=8)
    ax[1].barh(range(len(names)), [np.mean([r["chat_loss"] for r in results["runs"][n]["seeds"]
                                            .values()]) for n in names], color="tab:green")
    ax[1].set_yticks(range(len(names)), [""] * len(names))
    ax[1].invert_yaxis()
    losses = [np.mean([r["chat_loss"] for r in results["runs"][n]["seeds"].values()])
              for n in names]
    ax[1].set_xlim(0.9 * min(losses), 1.02 * max(losses))  # the differences, not the zero
    ax[1].set_xlabel("held-out chat loss (lower is better; axis from 0.9 x the lowest)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
