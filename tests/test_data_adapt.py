"""Documents -> GRIT training set: parsing of each document type, passages, the held-out split by
document, hard negatives from other documents only, determinism, bad input named or counted."""

import json
import os

import pytest

from grit_jax.data import adapt, documents, records
from grit_jax.data.__main__ import main as data_main
from grit_jax.data.records import SkipCounter
from grit_jax.rag import prompts

MARKDOWN = """---
layout: page
---
# The Lighthouse Keeper's Guide

Lighthouses guide ships along dangerous coasts. Each tower shows a light with its own pattern
of flashes, so that a sailor can tell which one he sees. See [the list](http://x.org/list).

## Lamps and **lenses**

Early lamps burned whale oil or kerosene. A `Fresnel` lens gathers the light into a narrow beam.

```python
print("code is not prose")
```

- Modern lights use electric lamps and need little care.
"""

RST = """Tides and Currents
==================

The tide rises and falls twice a day on most coasts. The moon pulls the ocean into two bulges.

.. note::
   :class: aside

   A note's body is prose of its section.

.. code-block:: python

   print("a code block is not prose")

.. function:: tide_height(hour)

   Return the height of the tide at an hour of the day, in metres.

   >>> tide_height(3)
   1.5

Spring tides
------------

When the sun and moon line up the tides are highest. See :func:`tide_table` for numbers::

    def tide_table(): pass

Tidal currents flow in and out of bays and estuaries.
"""


def test_markdown_title_sections_and_markup():
    doc = documents.parse("guide.md", MARKDOWN, "markdown", min_words=3)
    assert doc.title == "The Lighthouse Keeper's Guide"
    assert [s.heading for s in doc.sections] == [None, "Lamps and lenses"]
    text = " ".join(doc.passages)
    assert "See the list." in text and "http" not in text and "layout" not in text
    assert "code is not prose" not in text and "`" not in text
    assert "Fresnel lens" in text and "Modern lights use electric lamps" in text


def test_rst_title_sections_directives_and_literal_blocks():
    doc = documents.parse("tides.rst", RST, "rst", min_words=3)
    assert doc.title == "Tides and Currents"
    assert [s.heading for s in doc.sections] == [None, "tide_height(hour)", "Spring tides"]
    text = " ".join(doc.passages)
    assert "A note's body is prose of its section." in doc.sections[0].passages[0]
    assert doc.sections[1].passages == ("Return the height of the tide at an hour of the day, "
                                        "in metres.",)
    assert "print" not in text and "aside" not in text and ">>>" not in text
    assert "def tide_table" not in text
    assert "See tide_table for numbers:" in text and "Tidal currents flow" in text


def test_plain_text_title_line_and_file_name_fallback():
    doc = documents.parse("a/sailing_knots.txt", "Knots\n\nA bowline makes a fixed loop at the "
                          "end of a rope.\n", "text", min_words=3)
    assert doc.title == "Knots" and doc.passages == ["A bowline makes a fixed loop at the end of "
                                                     "a rope."]
    doc = documents.parse("a/sailing_knots.txt", "A bowline makes a fixed loop. It holds.\n",
                          "text", min_words=3)
    assert doc.title == "sailing knots"


def test_passages_keep_every_word_within_the_length():
    sents = [f"Sentence number {i} has exactly seven words." for i in range(40)]
    paras = [" ".join(sents[i:i + 5]) for i in range(0, 40, 5)]
    out = documents.passages_of(paras, passage_words=30, min_words=5)
    assert " ".join(out).split() == " ".join(paras).split()
    assert all(documents.words(p) <= 30 for p in out) and len(out) >= 280 // 30
    # Passages end at sentence ends.
    assert all(p.endswith(".") for p in out)
    # A section under min_words yields nothing; a long sentence is cut at words.
    assert documents.passages_of(["Too short."], 30, 5) == []
    assert [documents.words(p) for p in documents.passages_of([" ".join(["w"] * 70)], 30, 5)] \
        == [30, 30, 10]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: the demo's Wikipedia articles as Markdown files, plus JSONL and a copy."""
    from demo.wikipedia import articles

    root = tmp_path_factory.mktemp("docs")
    arts = articles()[:40]
    for i, (title, paras) in enumerate(arts[:30]):
        sub = root / ("part%d" % (i % 3))
        sub.mkdir(exist_ok=True)
        (sub / f"{i:02d}.md").write_text(f"# {title}\n\n" + "\n\n".join(paras[:3])
                                         + "\n\n## More\n\n" + "\n\n".join(paras[3:6]) + "\n")
    with open(root / "more.jsonl", "w") as f:
        for title, paras in arts[30:]:
            f.write(json.dumps({"title": title, "text": "\n\n".join(paras[:4])}) + "\n")
    (root / "copy.md").write_text((root / "part0" / "00.md").read_text())
    (root / "logo.png").write_bytes(b"\x89PNG")
    return root


def run(*argv):
    return data_main(["adapt", *(str(a) for a in argv)])


def read_split(out, split):
    folder = out / "jsonl" / split
    return {p[:-6]: [json.loads(line) for line in open(folder / p)]
            for p in sorted(os.listdir(folder))}


def test_training_set_from_documents(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--input", corpus, "--output", out, "--eval-fraction", "0.25") == 0
    printed = capsys.readouterr().out
    # copy.md comes first (a folder's files before its subfolders): its original is the copy.
    assert "duplicate document 1" in printed and "part0/00.md" in printed
    assert "not a document type (.png) 1" in printed
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["documents"]["train"] + report["documents"]["eval"] == 40
    assert report["documents"]["eval"] >= 3
    owner = {}  # passage -> document, from the documents themselves
    docs, _ = documents.read_documents(str(corpus), SkipCounter())
    for d in docs:
        for p in d.passages:
            owner.setdefault(p, d.id)
    split_docs = {}
    for split in ("train", "eval"):
        recs = read_split(out, split)
        assert set(recs) == (set(adapt.INSTRUCTIONS) | set(adapt.GENERATIVE)) - {"adapt_rag"}
        assert {k: len(v) for k, v in recs.items()} == report["records"][split]
        split_docs[split] = {owner[r["text"]] for r in recs["adapt_text"]}
        for task, instruction in adapt.INSTRUCTIONS.items():
            for r in recs[task]:
                assert r["query"][0] == instruction and len(r["neg"]) == 3
                doc = owner[r["pos"][0]] if r["pos"][0] in owner else None
                if task == "adapt_cloze":  # the rest of a passage: the one holding both parts
                    q, rest = r["query"][1], r["pos"][0]
                    whole = [p for p in owner if q in p and rest.split()[:8] ==
                             [w for w in p.replace(q, " ").split()][:8]]
                    assert len({owner[p] for p in whole}) == 1, (q, rest)
                    doc = owner[whole[0]]
                assert doc in split_docs[split]
                # Hard negatives: other documents of the same split, never the query's own.
                assert all(owner[n] != doc and owner[n] in split_docs[split] for n in r["neg"])
        # Every file is valid GRIT JSONL.
        for name in recs:
            kind, rows = records.read_records(str(out / "jsonl" / split / f"{name}.jsonl"),
                                              SkipCounter())
            assert kind == (records.GENERATIVE if name in adapt.GENERATIVE
                            else records.EMBEDDING) and len(rows) == len(recs[name])
    assert not split_docs["train"] & split_docs["eval"]  # held out whole
    # Held-out retrieval: every eval passage a candidate; a title's relevant passage opens it.
    by_id = {d.id: d for d in docs}
    folder = out / "retrieval" / "adapt_title"
    texts = {r["id"]: r["text"] for r in map(json.loads, open(folder / "corpus.jsonl"))}
    queries = {r["id"]: r["text"] for r in map(json.loads, open(folder / "queries.jsonl"))}
    assert sorted(texts.values()) == sorted(r["text"]
                                            for r in read_split(out, "eval")["adapt_text"])
    for q in map(json.loads, open(folder / "qrels.jsonl")):
        doc = by_id[owner[texts[q["doc_id"]]]]
        assert doc.title == queries[q["query_id"]] and doc.passages[0] == texts[q["doc_id"]]
    assert (len(queries) == report["documents"]["eval"]
            == report["retrieval"]["adapt_title"]["queries"])
    assert len(split_docs["eval"]) == report["documents"]["eval"]
    # The same seed gives the same bytes; another seed another split.
    assert run("--input", corpus, "--output", tmp_path / "again", "--eval-fraction", "0.25") == 0
    for split in ("train", "eval"):
        for name in os.listdir(out / "jsonl" / split):
            assert (out / "jsonl" / split / name).read_bytes() == \
                (tmp_path / "again" / "jsonl" / split / name).read_bytes()
    assert run("--input", corpus, "--output", tmp_path / "seed1", "--eval-fraction", "0.25",
               "--seed", "1") == 0
    assert read_split(tmp_path / "seed1", "eval") != read_split(out, "eval")


def test_build_makes_trainable_datasets(corpus, tmp_path):
    from grit_jax.data.dataset import open_dataset

    out = tmp_path / "out"
    assert run("--input", corpus, "--output", out, "--build", "--rag-chats", "--max-query-length",
               "64", "--max-passage-length", "128", "--max-generative-length", "256") == 0
    meta = open_dataset(str(out / "train"))[1]
    report = json.loads((out / "adapt_report.json").read_text())
    assert {n: v["examples"] for n, v in meta["datasets"].items()} == report["records"]["train"]
    # RAG chats: each question twice, the passage cached before it and inside it, answered with
    # the passage's opening
    rag = [json.loads(x) for x in (out / "jsonl" / "train" / "adapt_rag.jsonl").open()]
    chats = [json.loads(x) for x in (out / "jsonl" / "train" / "adapt_chat.jsonl").open()]
    assert len(rag) == 2 * len(chats) > 0
    for cached, inline in zip(rag[::2], rag[1::2]):
        passage, answer = cached["context"], cached["messages"][1]["content"]
        assert "context" not in inline and inline["messages"][1]["content"] == answer
        assert passage.startswith(answer) and 0 < len(answer.split()) <= max(
            adapt.ANSWER_WORDS, len(documents.sentences(passage)[0].split()))
        assert cached["messages"][0]["content"].endswith(prompts.DOC_FIRST)
        assert passage in inline["messages"][0]["content"]


def test_bad_documents_are_named_or_counted(corpus, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "good.md").write_text((corpus / "part0" / "00.md").read_text())
    (bad / "latin1.txt").write_bytes("Title\n\nCaf\xe9 society.\n".encode("latin-1"))
    (bad / "docs.jsonl").write_text('{"text": "fine text of a few words here and more"}\n'
                                    '{"title": "no text"}\n')
    out = tmp_path / "out"
    assert run("--input", bad, "--output", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "docs.jsonl:2: text:" in err and "Traceback" not in err
    assert not out.exists()
    (bad / "docs.jsonl").unlink()
    assert run("--input", bad, "--output", out) == 2
    assert "latin1.txt:3: not valid UTF-8" in capsys.readouterr().err
    (bad / "docs.jsonl").write_text('{"title": "no text"}\n')
    assert run("--input", bad, "--output", out, "--skip-invalid", "--eval-fraction", "0") == 0
    printed = capsys.readouterr().out
    assert "non_utf8 1" in printed and "missing_text 1" in printed
    # An existing output is refused and left as it was; bad numbers are named.
    assert run("--input", bad, "--output", out) == 2
    assert "--output" in capsys.readouterr().err and (out / "adapt_report.json").exists()
    assert run("--input", bad, "--output", tmp_path / "o2", "--eval-fraction", "1.5") == 2
    assert "--eval-fraction 1.5" in capsys.readouterr().err
    assert run("--input", tmp_path / "missing", "--output", tmp_path / "o3") == 2
    assert "missing" in capsys.readouterr().err
