"""Can short training teach SmolLM2 to answer from doc-cached (bidirectional) states?

A trial, not a measurement: from the demo's converted model and training set (run `make demo`
first), train the generative side only on the RAG-layout records (mostly ``adapt_rag``) with
causal attention, PrefixLM attention, or the doc cache's own layout (``context``: the cached
document read bidirectionally, the rest causally) for the same steps, then answer a few
questions about held-out passages with plain RAG and with doc caching, and print the answers
side by side.

``--demo``: train exactly as ``make demo`` does instead (its setting: both losses, the
generative rows mostly RAG chats) with each attention, and ask "What is {title}?" for the first
4 held-out titles: does the demo's ``gen_attention="context"`` make the difference?
``--titles N``: ask about the first N held-out titles (either training). ``--set KEY=VALUE``:
change the training config (``--set total_steps=10 --set optim.lr=1e-3``). Each run counts the
doc-cached answers that end at EOS before the token limit (``doc_stopped``).

Usage: python benchmarks/doc_cache_trial.py [--steps 30] [--attention causal prefix context]
       python benchmarks/doc_cache_trial.py --demo --attention causal context
Writes benchmarks/results/doc_cache_trial.json (``--demo``: doc_cache_trial_demo.json).
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is Amphibian?", "What are amphibians?"]
MAX_NEW_TOKENS = 40


def override(config, assignments):
    """Apply ``KEY=VALUE`` strings to an ml_collections config (values read as JSON, else text)."""
    values = {}
    for a in assignments:
        key, sep, text = a.partition("=")
        if not sep:
            sys.exit(f"error: --set {a}: expected KEY=VALUE")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    config.lock()  # a misspelt field is an error, not a new field
    try:
        config.update_from_flattened_dict(values)
    except (KeyError, AttributeError, TypeError) as e:
        sys.exit(f"error: --set: {e}")
    finally:
        config.unlock()


def trial(attention, steps, demo_out, workdir, demo=False, titles=0, assignments=()):
    """Answers of one training run: {question: {plain: ..., doc: ...}} and its losses."""
    from grit_jax import train
    from grit_jax.data.adapt import INSTRUCTIONS
    from configs import load as load_config
    from demo.smollm2 import LENGTHS as SMOL_LENGTHS
    from grit_jax.inference import GritLM
    from grit_jax.rag import RAG

    c = load_config(os.path.join(ROOT, "configs/smollm2_adapt.py"), setting="demo")
    c.init_from = os.path.join(demo_out, "smollm2")
    c.data.data_dir = os.path.join(demo_out, "adapted", "train")
    c.loss.gen_attention = attention
    if not demo:
        c.total_steps = c.checkpoint_every = steps
        c.loss.mode = "generative"
        # the trial's own optimizer and batch (the demo setting's may change)
        c.optim.lr, c.optim.clip_norm, c.data.generative_batch = 5e-4, 1.0, 4
        c.data.mixture = "adapt_text=0.1x,adapt_chat=0.2x,adapt_rag=4x"
    override(c, assignments)
    c.checkpoint_every = c.total_steps
    t = time.time()
    logged = train.train(c, workdir)
    seconds = time.time() - t
    model = GritLM.from_pretrained(workdir, attn="bbcc", pooling_method="mean")
    corpus = os.path.join(demo_out, "adapted", "retrieval", "adapt_title", "corpus.jsonl")
    with open(corpus) as f:
        passages = [json.loads(line)["text"] for line in f]
    passages = passages if demo or titles else passages[:20]  # titles: the whole corpus
    rag = RAG.build(model, passages, os.path.join(workdir, "index"), overwrite=True,
                    max_length=SMOL_LENGTHS["passage"],
                    query_instruction=INSTRUCTIONS["adapt_title"])
    questions = QUESTIONS
    titles = titles or (4 if demo else 0)
    if titles:
        with open(os.path.join(os.path.dirname(corpus), "queries.jsonl")) as f:
            questions = [f"What is {json.loads(line)['text']}?" for line in f][:titles]
    answers, stopped = {}, 0
    for q in questions:
        answers[q] = {}
        for cache, label in ((None, "plain"), ("doc", "doc")):
            a = rag.answer(q, cache=cache, max_new_tokens=MAX_NEW_TOKENS)
            answers[q][label] = {"passage": int(a.doc_ids[0]), "answer": a.text.strip()}
            stopped += cache == "doc" and len(a.tokens) < MAX_NEW_TOKENS  # ended at EOS
            print(f"[{attention}, {label}] {q!r} -> passage {a.doc_ids[0]}: {a.text.strip()!r}",
                  flush=True)
    return {"steps": c.total_steps, "loss_gen_first": logged[0]["loss_gen"],
            "loss_gen_last": logged[-1]["loss_gen"], "train_seconds": round(seconds),
            "doc_stopped": f"{stopped} of {len(questions)}", "answers": answers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--attention", nargs="+", default=["causal", "prefix", "context"],
                        choices=["causal", "prefix", "context"])
    parser.add_argument("--demo-out", default=os.path.join(ROOT, "demo_out"))
    parser.add_argument("--demo", action="store_true",
                        help="train as make demo does (its setting), ask 4 held-out titles")
    parser.add_argument("--titles", type=int, default=0,
                        help="ask 'What is {title}?' for the first N held-out titles (default: 4 "
                             "with --demo, else the two amphibian questions)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the training config after the setting (repeatable)")
    parser.add_argument("--out", default=None, help="results file (default: "
                        "benchmarks/results/doc_cache_trial.json, or _demo.json with --demo)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "benchmarks/results", "doc_cache_trial"
                                        f"{'_demo' if args.demo else ''}.json")
    sys.path.insert(0, ROOT)  # configs/ imports its siblings as the package `configs`
    if not os.path.isdir(os.path.join(args.demo_out, "adapted", "train")):
        sys.exit(f"error: {args.demo_out}: no demo training set (run `make demo` first)")
    results = {"training": "make demo's" if args.demo else "generative-only", "set": args.set,
               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for attention in args.attention:
            results["runs"][attention] = trial(attention, args.steps, args.demo_out,
                                               os.path.join(tmp, attention), args.demo,
                                               args.titles, args.set)
    results["steps"] = results["runs"][args.attention[0]]["steps"]  # the same for every run
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
