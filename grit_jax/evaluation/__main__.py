"""``python -m grit_jax.evaluation --model PATH --task KIND:PATH [...] [--out results.json]``.

Evaluates a GRIT model (a training workdir, params directory or Hugging Face directory) on
embedding tasks (retrieval, STS, classification, clustering) and held-out generative loss; see
``grit_jax.evaluation.tasks`` for the file formats. Prints one line per task and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from grit_jax import cli, outputs
from grit_jax.evaluation.tasks import TASK_KINDS, evaluate_task, load_tasks
from grit_jax.inference import GritLM


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m grit_jax.evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="workdir, params or Hugging Face directory")
    p.add_argument("--task", action="append", required=True,
                   help=f"KIND:PATH or KIND:NAME=PATH, KIND in {', '.join(TASK_KINDS)} (repeat)")
    p.add_argument("--instruction", default="",
                   help="query instruction for every embedding task (default: the task's own)")
    p.add_argument("--attn", default="bbcc", help="attention of the embedding pass (bbcc/cccc)")
    p.add_argument("--pooling", default="mean", help="mean, weightedmean or lasttoken")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per embedded text (default: 512, or the model's positions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)

    for flag, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise cli.UserError(f"{flag} {value}: must be > 0")
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise cli.UserError(f"--out {args.out}: already exists; choose a new path, or pass "
                            f"--overwrite")
    # all inputs checked before the model loads
    tasks = [t for spec in args.task for t in load_tasks(spec)]
    model = GritLM.from_pretrained(args.model, attn=args.attn, pooling_method=args.pooling)
    results = {"model": args.model, "fingerprint": model.fingerprint, "attn": args.attn,
               "pooling": args.pooling, "tasks": {}}
    memo = {}  # tasks over one corpus embed it once
    for task in tasks:
        t0 = time.time()
        r = evaluate_task(model, task, instruction=args.instruction,
                          batch_size=args.batch_size, max_length=args.max_length, memo=memo)
        r["seconds"] = round(time.time() - t0, 2)
        results["tasks"][task.name] = r
        shown = {k: round(v, 4) if isinstance(v, float) else
                 [round(x, 4) for x in v] if isinstance(v, list) else v for k, v in r.items()}
        print(f"{task.name}: {shown}")
    if args.out:
        outputs.write_file(args.out, json.dumps(results, indent=1), overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
