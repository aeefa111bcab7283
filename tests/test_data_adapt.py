"""Documents -> GRIT training set: the held-out split by document, hard negatives from other
documents only, determinism, bad input named or counted (parsing: test_data_documents.py)."""

import json
import os

import pytest

from grit_jax.data import adapt, documents, records
from grit_jax.data.__main__ import main as data_main
from grit_jax.data.records import SkipCounter
from grit_jax.rag import prompts

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
