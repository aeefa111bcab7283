"""``python -m grit_jax.data.build --input JSONL_DIR --output DATA_DIR``: build a GRIT dataset.

One split per JSONL file; records validated and tokenised with exact spans. Bad input stops the
build with ``file:line: field: problem`` unless ``--skip-invalid``, which skips and counts per
reason (also stored in the dataset's metadata).
"""

from __future__ import annotations

import argparse
import sys

from grit_jax import cli
from grit_jax.data.dataset import DEFAULT_MAX_LENGTHS, build


def main(argv=None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m grit_jax.data.build", description=__doc__)
    p.add_argument("--input", required=True, help="folder of *.jsonl files (one dataset each)")
    p.add_argument("--output", required=True, help="TFDS data_dir to write")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model / tokenizer.json or a folder (default: bundled Mistral)")
    p.add_argument("--max-query-length", type=int, default=DEFAULT_MAX_LENGTHS["query"])
    p.add_argument("--max-passage-length", type=int, default=DEFAULT_MAX_LENGTHS["passage"])
    p.add_argument("--max-generative-length", type=int, default=DEFAULT_MAX_LENGTHS["generative"])
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records and report counts per reason instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --output (default: refuse)")
    args = p.parse_args(argv)
    lengths = {"query": args.max_query_length, "passage": args.max_passage_length,
               "generative": args.max_generative_length}
    for name, n in lengths.items():
        if n <= 0:
            raise cli.UserError(f"--max-{name}-length {n}: must be > 0")
    builder = build(args.input, args.output, tokenizer=args.tokenizer, max_lengths=lengths,
                    skip_invalid=args.skip_invalid, overwrite=args.overwrite)
    meta = builder.info.metadata
    for name, d in meta["datasets"].items():
        cut = d.get("truncated") or {}
        print(f"{name}: {d['kind']}, {d['examples']} examples, {d['tokens']} tokens ({d['file']})"
              + ("; truncated at max length: " + ", ".join(f"{v} {k}" + ("s" if v > 1 else "")
                                                          for k, v in sorted(cut.items()))
                 if cut else ""))
    skipped = meta["skipped"]
    print(f"skipped: {sum(skipped.values())}" + (f" {skipped}" if skipped else ""))
    print(f"-> {args.output} (give this folder to training as data.data_dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
