"""A small real GRIT training set from the Wikipedia pages shipped in gensim's test data.

``python -m demo.wikipedia --out DIR`` writes JSONL (``DIR/jsonl/{train,eval}``) and
builds them (``DIR/{train,eval}``). Source: the ~100 English Wikipedia articles in gensim 4.x's
``test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(CC BY-SA 3.0, Wikipedia contributors); nothing is downloaded and nothing is committed.
A held-out tenth of the articles (chosen by a hash of the title) goes to ``eval`` only.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import importlib.util
import os
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np

from demo import NotInstalled
from grit_jax import cli, outputs
from grit_jax.data.dataset import build, open_dataset
from grit_jax.data.records import write_jsonl

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TITLE_INSTRUCTION = "Given a Wikipedia article title, retrieve a passage from that article"
SENTENCE_INSTRUCTION = ("Given the opening sentence of a Wikipedia article, retrieve another "
                        "passage of the same article")
LENGTHS = {"query": 64, "passage": 128, "generative": 128}  # configs/tiny.py's data


def wiki_dump_path() -> str:
    """Where the Wikipedia dump lies inside the installed gensim wheel (not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalled("gensim is not installed: pip install --no-deps gensim==4.4.0 "
                                "(only its test data is used)")
    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", WIKI_FILE)
    if not os.path.exists(path):
        raise NotInstalled(f"{path}: missing from the installed gensim")
    return path


def _strip_nested(text: str, open_: str, close: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain text from wiki markup: templates, tables, refs, files and formatting removed."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "-").replace("&mdash;", "-")
    return text


def articles(path: str | None = None) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of every real article (no redirects) in the dump."""
    out = []
    with bz2.open(path or wiki_dump_path(), "rb") as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.find("{*}ns")
            title = el.find("{*}title").text or ""
            text = el.find("{*}revision/{*}text")
            body = (text.text or "") if text is not None else ""
            el.clear()
            if (ns is not None and ns.text != "0") or body.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs = []
            for block in re.split(r"\n\s*\n", clean_wikitext(body)):
                block = " ".join(line.strip() for line in block.splitlines()
                                 if line.strip() and not line.lstrip().startswith(("=", "*", "#",
                                                                                   ":", "|", "!")))
                block = re.sub(r"\s+", " ", block).strip()
                if len(block) >= 200:
                    paragraphs.append(block)
            if len(paragraphs) >= 3:
                out.append((title, paragraphs))
    return out


def _first_sentence(p: str) -> str:
    m = re.match(r"(.+?[.!?])\s", p + " ")
    return m.group(1) if m else p


def _clip(p: str, chars: int = 1200) -> str:
    return p if len(p) <= chars else p[:chars].rsplit(" ", 1)[0]


def is_heldout(title: str) -> bool:
    """One article in ten, fixed by a hash of its title."""
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % 10 == 0


def make_records(arts, seed: int = 0):
    """{file name: [records]} for a list of (title, paragraphs)."""
    rng = np.random.default_rng(seed)
    out = {"wiki_title_to_passage": [], "wiki_sentence_to_passage": [], "wiki_chat": []}

    def negatives(skip, n=3):
        others = [j for j in range(len(arts)) if j != skip]
        return [_clip(arts[j][1][int(rng.integers(len(arts[j][1])))])
                for j in rng.choice(others, size=min(n, len(others)), replace=False)]

    for a, (title, paras) in enumerate(arts):
        out["wiki_title_to_passage"].append({
            "query": [TITLE_INSTRUCTION, title], "pos": [_clip(p) for p in paras[:3]],
            "neg": negatives(a)})
        out["wiki_sentence_to_passage"].append({
            "query": [SENTENCE_INSTRUCTION, _first_sentence(paras[0])],
            "pos": [_clip(p) for p in paras[1:4]], "neg": negatives(a)})
        out["wiki_chat"].append({"text": [f"Tell me about {title}.", _clip(paras[0], 800)]})
        out["wiki_chat"].append({"messages": [
            {"role": "user", "content": f"What is the first sentence of the Wikipedia article "
                                        f"on {title}?"},
            {"role": "assistant", "content": _first_sentence(paras[0])}]})
    return out


def make_demo_data(out: str, *, max_lengths: dict | None = None, seed: int = 0,
                   overwrite: bool = False) -> dict:
    """Write train/eval JSONL and build both datasets into ``out`` (whole or not at all; an
    existing folder holding files is replaced only with ``overwrite``); {split: data_dir}."""
    arts = articles()
    parts = {"train": [a for a in arts if not is_heldout(a[0])],
             "eval": [a for a in arts if is_heldout(a[0])]}
    with outputs.staged_dir(out, overwrite=overwrite) as staging:
        for split, arts_ in parts.items():
            jsonl = os.path.join(staging, "jsonl", split)
            write_jsonl(jsonl, make_records(arts_, seed=seed))
            build(jsonl, os.path.join(staging, split), max_lengths=max_lengths)
    return {split: os.path.join(out, split) for split in parts}


def training_data(root: str) -> str:
    """The demo set built under ``root`` on first use (reused after); its train directory."""
    if not os.path.isdir(os.path.join(root, "train")):
        make_demo_data(root, max_lengths=LENGTHS)
    return os.path.join(root, "train")


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.wikipedia", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--max-passage-length", type=int, default=256)
    p.add_argument("--max-generative-length", type=int, default=256)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing folder at --out (default: refuse)")
    args = p.parse_args(argv)
    lengths = {"query": args.max_query_length, "passage": args.max_passage_length,
               "generative": args.max_generative_length}
    for name, n in lengths.items():
        if n <= 0:
            raise cli.UserError(f"--max-{name}-length {n}: must be > 0")
    for split, d in make_demo_data(args.out, max_lengths=lengths,
                                   overwrite=args.overwrite).items():
        meta = open_dataset(d)[1]
        counts = ", ".join(f"{n}={v['examples']}" for n, v in meta["datasets"].items())
        print(f"{split}: {counts} -> {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
