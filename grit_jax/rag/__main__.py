"""RAG from the command line.

    python -m grit_jax.rag index --model MODEL --corpus docs.jsonl --out INDEX_DIR
    python -m grit_jax.rag ask --model MODEL --index INDEX_DIR --query "..." --cache doc

MODEL is a Hugging Face directory, a grit_jax params directory or a training workdir. ``ask``
prints one JSON object: the answer, the retrieved documents and the time it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from grit_jax import cli, outputs
from grit_jax.inference import GritLM
from grit_jax.rag.pipeline import RAG, read_corpus
from grit_jax.rag.prompts import CACHE_MODES

MODES = ("none", *CACHE_MODES)


def _model(args):
    return GritLM.from_pretrained(args.model, tokenizer=args.tokenizer, attn=args.attn,
                                  pooling_method=args.pooling_method)


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise cli.UserError(f"{name} {value}: must be >= {minimum}")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_jax.rag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("index", "ask"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="HF dir, params dir or training workdir")
        p.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: --model)")
        p.add_argument("--attn", default="bbcc", choices=("bbcc", "cccc", "bb", "cc"))
        p.add_argument("--pooling-method", default="mean")
    ix = sub.choices["index"]
    ix.add_argument("--corpus", required=True, help="JSONL: {text, title?, id?} per line")
    ix.add_argument("--out", required=True, help="index directory to write")
    ix.add_argument("--no-cache-docs", action="store_true",
                    help="do not store the documents' key/value states (no doc caching)")
    ix.add_argument("--max-length", type=int, default=None, help="document token limit")
    ix.add_argument("--batch-size", type=int, default=8)
    ix.add_argument("--overwrite", action="store_true",
                    help="replace an existing index at --out (default: refuse)")
    ask = sub.choices["ask"]
    ask.add_argument("--index", required=True)
    ask.add_argument("--query", required=True, action="append", help="repeat for several")
    ask.add_argument("--cache", default="none", choices=MODES)
    ask.add_argument("--no-retrieval", action="store_true", help="answer without any context")
    ask.add_argument("--top-k", type=int, default=1)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--answer-prefix", default="")
    ask.add_argument("--query-instruction", default="",
                     help="retrieval instruction for the query's embedding (default: none)")
    ask.add_argument("--no-rerotate", action="store_true",
                     help="joined caches keep the positions they were computed with (reference)")
    args = parser.parse_args(argv)

    if args.command == "index":  # every input checked before the model loads
        _positive("--batch-size", args.batch_size)
        _positive("--max-length", args.max_length)
        outputs.check_target(args.out, overwrite=args.overwrite)
        docs = read_corpus(args.corpus)
    else:
        _positive("--top-k", args.top_k)
        _positive("--max-new-tokens", args.max_new_tokens)
        if not os.path.isdir(args.index):
            raise cli.UserError(f"--index {args.index}: no such folder (build one with "
                                f"python -m grit_jax.rag index)")
    model = _model(args)
    if args.command == "index":
        start = time.perf_counter()
        rag = RAG.build(model, docs, args.out, cache_docs=not args.no_cache_docs,
                        batch_size=args.batch_size, max_length=args.max_length,
                        overwrite=args.overwrite)
        print(json.dumps({"index": args.out, "docs": len(rag.docs), "cached": rag.store is not None,
                          "truncated_docs": rag.meta["truncated_docs"],
                          "seconds": round(time.perf_counter() - start, 3)}))
        return 0
    rag = RAG.load(args.index, model, query_instruction=args.query_instruction)
    start = time.perf_counter()
    answers = rag.answer(args.query, cache=None if args.cache == "none" else args.cache,
                         retrieval=not args.no_retrieval, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, answer_prefix=args.answer_prefix,
                         rerotate=not args.no_rerotate)
    seconds = time.perf_counter() - start
    out = [{"query": q, "answer": a.text,
            "docs": [{"row": r, "id": rag.docs[r]["id"], "title": rag.docs[r]["title"],
                      "score": round(s, 4)} for r, s in zip(a.doc_ids, a.scores)],
            "cached_tokens": a.cached_tokens, "prompt_tokens": a.prompt_tokens}
           for q, a in zip(args.query, answers)]
    print(json.dumps({"cache": args.cache, "answers": out, "seconds": round(seconds, 3)},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
