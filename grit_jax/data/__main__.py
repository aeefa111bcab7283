"""``python -m grit_jax.data {build,adapt}``: GRIT datasets for ``grit_jax.train``.

build: a folder of GRIT JSONL files -> a tokenised dataset (one split per file; records
validated and tokenised with exact spans). Bad input stops the build with
``file:line: field: problem`` unless ``--skip-invalid``, which skips and counts per reason (also
stored in the dataset's metadata).

adapt: a folder of your own documents (text, Markdown, reStructuredText, JSONL) -> GRIT JSONL
records, held-out retrieval tasks and, with ``--build``, the datasets (see
``grit_jax.data.adapt``).
"""

from __future__ import annotations

import argparse
import sys

from grit_jax import cli
from grit_jax.data import adapt
from grit_jax.data.dataset import DEFAULT_MAX_LENGTHS, build

KINDS = ("query", "passage", "generative")


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _max_lengths(p: argparse.ArgumentParser, help_suffix: str = "") -> None:
    for name in KINDS:
        p.add_argument(f"--max-{name}-length", type=int, default=DEFAULT_MAX_LENGTHS[name],
                       help=f"{help_suffix}(default {DEFAULT_MAX_LENGTHS[name]})")


def _lengths(args) -> dict:
    """The --max-*-length flags, each checked to be positive."""
    lengths = {n: getattr(args, f"max_{n}_length") for n in KINDS}
    for name, n in lengths.items():
        if n <= 0:
            raise cli.UserError(f"--max-{name}-length {n}: must be > 0")
    return lengths


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grit_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="GRIT JSONL files -> a tokenised dataset")
    b.add_argument("--input", required=True, help="folder of *.jsonl files (one dataset each)")
    b.add_argument("--output", required=True, help="TFDS data_dir to write")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer.model / tokenizer.json or a folder (default: bundled Mistral)")
    _max_lengths(b)
    b.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records and report counts per reason instead of stopping")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --output (default: refuse)")

    a = sub.add_parser("adapt", help="your documents -> a GRIT training set",
                       description=adapt.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--input", required=True,
                   help="a folder (searched recursively) or a file of .txt/.md/.rst/.jsonl")
    a.add_argument("--output", required=True, help="folder to write (refused if it exists)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of documents held out whole for evaluation (default 0.1)")
    a.add_argument("--passage-words", type=int, default=120,
                   help="paragraphs are merged or split into passages of about this many words")
    a.add_argument("--min-words", type=int, default=12,
                   help="shorter passages are dropped (a short remainder joins its neighbour)")
    a.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    a.add_argument("--skip-invalid", action="store_true",
                   help="skip files that are not UTF-8 and bad JSONL lines, counted, instead of "
                        "stopping at the first")
    a.add_argument("--rag-chats", action="store_true",
                   help="also write adapt_rag: questions answered from their passage in GRIT's "
                        "RAG layouts (doc-cached and plain)")
    a.add_argument("--build", action="store_true",
                   help="also build the train/eval datasets (tokenised) for grit_jax.train")
    a.add_argument("--tokenizer", default=None, help="for --build (default: bundled Mistral)")
    _max_lengths(a, "for --build ")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing folder at --output (default: refuse)")
    args = parser.parse_args(argv)
    return run_build(args) if args.command == "build" else run_adapt(args)


def run_build(args) -> int:
    """Build and print what each dataset holds, what was cut and what was skipped."""
    builder = build(args.input, args.output, tokenizer=args.tokenizer, max_lengths=_lengths(args),
                    skip_invalid=args.skip_invalid, overwrite=args.overwrite)
    meta = builder.info.metadata
    for name, d in meta["datasets"].items():
        cut = d.get("truncated") or {}
        ctx = (f", {d['context']} after a cached document (context)"
               if d.get("context") else "")
        cuts = ", ".join(f"{v} {k}" + ("s" if v > 1 else "") for k, v in sorted(cut.items()))
        print(f"{name}: {d['kind']}, {d['examples']} examples{ctx}, {d['tokens']} tokens "
              f"({d['file']})" + (f"; truncated at max length: {cuts}" if cut else ""))
    skipped = meta["skipped"]
    print(f"skipped: {sum(skipped.values())}" + (f" {skipped}" if skipped else ""))
    print(f"-> {args.output} (give this folder to training as data.data_dir)")
    return 0


def run_adapt(args) -> int:
    """Adapt the documents and print the report's summary."""
    report = adapt.adapt(args.input, args.output, seed=args.seed,
                         eval_fraction=args.eval_fraction, passage_words=args.passage_words,
                         min_words=args.min_words, negatives=args.negatives,
                         skip_invalid=args.skip_invalid, overwrite=args.overwrite,
                         build=args.build, tokenizer=args.tokenizer, max_lengths=_lengths(args),
                         rag_chats=args.rag_chats)
    print(adapt.summary(report))
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
