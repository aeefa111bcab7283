"""``python -m grit_jax.data.build --input JSONL_DIR --output DATA_DIR``: build a GRIT dataset.

One split per JSONL file; records validated and tokenised with exact spans. Bad input stops the
build with ``file:line: field: problem`` unless ``--skip-invalid``, which skips and counts per
reason (also stored in the dataset's metadata).
"""

from __future__ import annotations

import argparse
import sys

from grit_jax.data.dataset import DEFAULT_MAX_LENGTHS, build


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    lengths = {"query": args.max_query_length, "passage": args.max_passage_length,
               "generative": args.max_generative_length}
    try:
        builder = build(args.input, args.output, tokenizer=args.tokenizer, max_lengths=lengths,
                        skip_invalid=args.skip_invalid)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = builder.info.metadata
    for name, d in meta["datasets"].items():
        print(f"{name}: {d['kind']}, {d['examples']} examples, {d['tokens']} tokens ({d['file']})")
    skipped = meta["skipped"]
    print(f"skipped: {sum(skipped.values())}" + (f" {skipped}" if skipped else ""))
    print(f"-> {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
