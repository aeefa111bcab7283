"""``python -m grit_jax.data adapt --input DOCS --output DIR``: a GRIT training set from your own
unlabeled documents.

Embedding records (self-supervised pairs, each with hard negatives from *other* documents of the
same split, found by word overlap):
- ``adapt_title``: a document's title -> its first passage;
- ``adapt_heading``: "title: heading" of a section -> the section's first passage;
- ``adapt_cloze``: a sentence -> the rest of its passage (the inverse cloze task);
- ``adapt_next``: a passage -> the passage after it.
Generative records: ``adapt_chat`` (a user asks about a document or a section, the assistant
answers with its passage) and ``adapt_text`` (every passage as plain text, every token trained);
with ``--rag-chats`` also ``adapt_rag``: the same questions asked in GRIT's two RAG layouts (the
passage cached before the question, and in the question: ``grit_jax.rag.prompts``), answered with
the passage's opening sentences, so the model learns to answer from the retrieved context.

Documents go whole to ``train`` or to the held-out ``eval`` split (a seeded hash of the
document's id), duplicate documents and passages are dropped, and every choice is a function of
the seed. Writes ``DIR/jsonl/{train,eval}/*.jsonl``, the held-out retrieval tasks over every
eval passage (``DIR/retrieval/<task>/{queries,corpus,qrels}.jsonl``; ``python -m
grit_jax.evaluation --task adapted:DIR`` runs them and the held-out generative loss) and
``DIR/adapt_report.json`` (counts, every skip with its reason, the skipped documents by name);
``--build`` also builds the datasets (``DIR/train``, ``DIR/eval``) for ``grit_jax.train``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re

import numpy as np

from grit_jax import outputs
from grit_jax.data import documents as docs_lib
from grit_jax.data.dataset import build as build_dataset
from grit_jax.data.records import SkipCounter, write_jsonl
from grit_jax.rag import prompts

# Instructions in GRIT's embedding format (``<|user|>\n{instruction}\n<|embed|>\n``): one per
# task, saying what the query is and what it retrieves, as in the E5 data GritLM trained on.
INSTRUCTIONS = {
    "adapt_title": "Given the title of a document, retrieve the opening passage of that document",
    "adapt_heading": "Given a document title and a section heading, retrieve the passage under "
                     "that heading",
    "adapt_cloze": "Given a sentence, retrieve the passage it was taken from",
    "adapt_next": "Given a passage of a document, retrieve the passage that follows it",
}
GENERATIVE = ("adapt_chat", "adapt_text", "adapt_rag")
ANSWER_WORDS = 40  # an adapt_rag answer: the passage's opening sentences, up to about this many
STOPWORDS = frozenset("""a an and are as at be by for from has have in is it its of on or that
the this to was were will with which not can you your we our they their these those also""".split())


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8],
                          "little")


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether a document goes to ``eval``: a seeded hash of its id, so adding documents never
    moves another one."""
    return _digest("split", seed, doc_id) % 1_000_000 < fraction * 1_000_000


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def deduplicate(documents, counts: collections.Counter):
    """Documents whose text repeats an earlier one dropped (named), and passages seen before
    removed from later documents; counted."""
    seen_docs, seen_passages, out, dropped = set(), set(), [], []
    for doc in documents:
        key = hashlib.sha256(_norm(" ".join(doc.passages)).encode()).digest()
        if key in seen_docs:
            counts["duplicate document"] += 1
            dropped.append(doc.id)
            continue
        seen_docs.add(key)
        sections = []
        for s in doc.sections:
            kept = []
            for p in s.passages:
                k = hashlib.sha256(_norm(p).encode()).digest()
                if k in seen_passages:
                    counts["duplicate passage"] += 1
                else:
                    seen_passages.add(k)
                    kept.append(p)
            if kept:
                sections.append(docs_lib.Section(s.heading, tuple(kept)))
        if sections:
            out.append(docs_lib.Document(doc.id, doc.title, tuple(sections)))
        else:
            counts["document made only of duplicate passages"] += 1
            dropped.append(doc.id)
    return out, dropped


class NegativeIndex:
    """Passages of one split, searchable by IDF-weighted word overlap (a sparse term matrix):
    the hard negatives of a query are the best-matching passages of *other* documents."""

    def __init__(self, documents, max_df: int = 2000):
        from scipy import sparse

        self.passages, owner, vocab, rows, cols = [], [], {}, [], []
        for d, doc in enumerate(documents):
            for p in doc.passages:
                for t in self.terms(p):
                    rows.append(len(self.passages))
                    cols.append(vocab.setdefault(t, len(vocab)))
                self.passages.append(p)
                owner.append(d)
        self.owner, self.vocab = np.asarray(owner), vocab
        n = len(self.passages)
        df = np.bincount(np.asarray(cols, np.int64), minlength=len(vocab))
        # A word in most passages says nothing about any of them.
        self.idf = np.where(df <= max_df, np.log1p(n / np.maximum(df, 1)), 0.0)
        self.matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                        shape=(n, len(vocab))).T.tocsr()  # terms x passages

    @staticmethod
    def terms(text: str) -> frozenset:
        return frozenset(w for w in _norm(text).split() if w not in STOPWORDS and len(w) > 1)

    def negatives(self, queries, k: int, seed: int, chunk: int = 512) -> list[list[str]]:
        """For each (query text, document number, name): k passages of other documents, the
        best overlap first (its 16 rarest words weighted by IDF; ties by position); a shortfall
        filled with random passages of other documents, seeded by (seed, name)."""
        from scipy import sparse

        out = []
        for start in range(0, len(queries), chunk):
            part = queries[start:start + chunk]
            rows, cols, vals = [], [], []
            for r, (text, _, _) in enumerate(part):
                ids = [self.vocab[t] for t in self.terms(text) if t in self.vocab]
                for j in sorted(ids, key=lambda j: (-self.idf[j], j))[:16]:
                    rows.append(r)
                    cols.append(j)
                    vals.append(self.idf[j])
            q = sparse.csr_matrix((vals, (rows, cols)), shape=(len(part), len(self.vocab)))
            scores = np.asarray((q @ self.matrix).todense())
            docs = np.asarray([d for _, d, _ in part])
            scores[self.owner[None, :] == docs[:, None]] = -1.0  # never the query's document
            for r, (_, d, name) in enumerate(part):
                row = scores[r]
                best = np.argsort(-row, kind="stable")[:k]
                picked = [int(i) for i in best if row[i] > 0]
                rng = np.random.default_rng([seed, _digest("negatives", name)])
                for _ in range(50 * k):  # a shortfall: random passages of other documents
                    if len(picked) >= k:
                        break
                    i = int(rng.integers(len(self.passages)))
                    if self.owner[i] != d and i not in picked:
                        picked.append(i)
                out.append([self.passages[i] for i in picked])
        return out


def opening(passage: str, words: int = ANSWER_WORDS) -> str:
    """The passage's first sentences, at least one, while they stay within ``words`` words."""
    sents = docs_lib.sentences(passage)
    out = sents[:1]
    for s in sents[1:]:
        if docs_lib.words(" ".join(out + [s])) > words:
            break
        out.append(s)
    return " ".join(out)


def rag_records(question: str, passage: str) -> list[dict]:
    """A question answered from its passage in both of GRIT's RAG layouts: the passage as the
    cached document before the question (doc caching), and inside the question (plain RAG)."""
    answer = {"role": "assistant", "content": opening(passage)}
    return [{"context": passage, "messages": [
                {"role": "user", "content": f"{question}\n\n{prompts.DOC_FIRST}"}, answer]},
            {"messages": [{"role": "user", "content": f"{question}\n\n{passage}\n\n"
                                                      f"{prompts.QUERY_FIRST}"}, answer]}]


def records_for(documents, *, seed: int, negatives: int, split: str,
                rag: bool = False) -> dict[str, list[dict]]:
    """{file name: records} of one split's documents (``rag``: also ``adapt_rag``)."""
    out = {name: [] for name in list(INSTRUCTIONS) + list(GENERATIVE)}
    queries, records = [], []  # (query, document number, name) of every embedding record

    def emb(task, query, positive, d):
        records.append({"query": [INSTRUCTIONS[task], query], "pos": [positive], "neg": []})
        out[task].append(records[-1])
        queries.append((query, d, f"{split}/{task}/{len(out[task])}"))

    for d, doc in enumerate(documents):
        rng = np.random.default_rng([seed, _digest("records", split, doc.id)])
        ps = doc.passages
        if doc.title:
            emb("adapt_title", doc.title, ps[0], d)
            out["adapt_chat"].append({"messages": [
                {"role": "user", "content": f"What is \"{doc.title}\" about?"},
                {"role": "assistant", "content": ps[0]}]})
            if rag:
                out["adapt_rag"] += rag_records(f"What is {doc.title}?", ps[0])
        for s in doc.sections:
            if s.heading:
                query = f"{doc.title}: {s.heading}" if doc.title else s.heading
                emb("adapt_heading", query, s.passages[0], d)
                out["adapt_chat"].append({"messages": [
                    {"role": "user", "content": f"What does the section \"{s.heading}\""
                                                + (f" of \"{doc.title}\"" if doc.title else "")
                                                + " say?"},
                    {"role": "assistant", "content": s.passages[0]}]})
                if rag:
                    about = f" of \"{doc.title}\"" if doc.title else ""
                    question = f"What does the section \"{s.heading}\"{about} say?"
                    out["adapt_rag"] += rag_records(question, s.passages[0])
        for i, p in enumerate(ps):
            sents = docs_lib.sentences(p)
            if len(sents) >= 3:
                j = int(rng.integers(len(sents)))
                emb("adapt_cloze", sents[j], " ".join(sents[:j] + sents[j + 1:]), d)
            if i + 1 < len(ps):
                emb("adapt_next", p, ps[i + 1], d)
            out["adapt_text"].append({"text": p})
    if negatives:
        for r, neg in zip(records, NegativeIndex(documents).negatives(queries, negatives, seed)):
            r["neg"] = neg
    return out


RETRIEVAL = ("adapt_title", "adapt_heading", "adapt_cloze")  # held-out tasks, BEIR layout


def retrieval_tasks(documents) -> dict[str, dict[str, list[dict]]]:
    """Held-out retrieval over *every* passage of the documents: {task: {"corpus", "queries",
    "qrels"}} (title / "title: heading" -> the passage that opens it; a sentence -> the passage
    that holds it)."""
    corpus, first, qs = [], {}, {t: [] for t in RETRIEVAL}
    for doc in documents:
        for s in doc.sections:
            for j, p in enumerate(s.passages):
                if j == 0:
                    first[id(s)] = len(corpus)
                corpus.append({"id": f"p{len(corpus)}", "text": p})
    for doc in documents:
        doc_start = None
        for s in doc.sections:
            k = first[id(s)]
            doc_start = k if doc_start is None else doc_start
            if s.heading:
                query = f"{doc.title}: {s.heading}" if doc.title else s.heading
                qs["adapt_heading"].append((query, k))
            for j, p in enumerate(s.passages):
                sents = docs_lib.sentences(p)
                if len(sents) >= 3:  # the middle sentence: neither an opening nor a closing
                    qs["adapt_cloze"].append((sents[len(sents) // 2], k + j))
        if doc.title:
            qs["adapt_title"].append((doc.title, doc_start))
    out = {}
    for task, pairs in qs.items():
        if not pairs:
            continue
        out[task] = {
            "corpus": corpus,
            "queries": [{"id": f"q{i}", "instruction": INSTRUCTIONS[task], "text": q}
                        for i, (q, _) in enumerate(pairs)],
            "qrels": [{"query_id": f"q{i}", "doc_id": f"p{k}", "score": 1}
                      for i, (_, k) in enumerate(pairs)]}
    return out


def adapt(input_path: str, output: str, *, seed: int = 0, eval_fraction: float = 0.1,
          passage_words: int = 120, min_words: int = 12, negatives: int = 3,
          skip_invalid: bool = False, overwrite: bool = False, build: bool = False,
          tokenizer: str | None = None, max_lengths: dict | None = None,
          rag_chats: bool = False) -> dict:
    """Write the training set (see the module); returns the report."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction {eval_fraction}: must be in [0, 1)")
    if passage_words < 8 or not 1 <= min_words <= passage_words:
        raise ValueError(f"--passage-words {passage_words} / --min-words {min_words}: need "
                         f"passage-words >= 8 and 1 <= min-words <= passage-words")
    if negatives < 0:
        raise ValueError(f"--negatives {negatives}: must be >= 0")
    outputs.check_target(output, overwrite=overwrite, flag="--output")
    skips = SkipCounter(enabled=skip_invalid)
    found, empty = docs_lib.read_documents(input_path, skips, passage_words=passage_words,
                                           min_words=min_words)
    counts = collections.Counter(skips.counts)
    if empty:
        counts[f"no passage of {min_words}+ words"] += len(empty)
    found, duplicates = deduplicate(found, counts)
    if not found:
        raise ValueError(f"{input_path}: no document has a passage of {min_words} or more words")
    splits = {"train": [d for d in found if not is_heldout(d.id, seed, eval_fraction)],
              "eval": [d for d in found if is_heldout(d.id, seed, eval_fraction)]}
    if not splits["train"]:
        raise ValueError(f"{input_path}: every document went to eval; lower --eval-fraction")
    report = {"input": os.path.abspath(input_path), "seed": seed, "eval_fraction": eval_fraction,
              "passage_words": passage_words, "min_words": min_words, "negatives": negatives,
              "rag_chats": rag_chats,
              "documents": {k: len(v) for k, v in splits.items()},
              "passages": {k: sum(len(d.passages) for d in v) for k, v in splits.items()},
              "records": {}, "skipped": dict(sorted(counts.items())),
              "skipped_documents": {"no passage": empty, "duplicate": duplicates}}
    with outputs.staged_dir(output, overwrite=overwrite, flag="--output") as staging:
        for split, documents in splits.items():
            if not documents:
                continue
            recs = records_for(documents, seed=seed, negatives=negatives, split=split,
                               rag=rag_chats)
            recs = {k: v for k, v in recs.items() if v}
            folder = os.path.join(staging, "jsonl", split)
            write_jsonl(folder, recs)
            report["records"][split] = {k: len(v) for k, v in recs.items()}
            if split == "eval":
                for task, files in retrieval_tasks(documents).items():
                    write_jsonl(os.path.join(staging, "retrieval", task), files)
                    report.setdefault("retrieval", {})[task] = {
                        "queries": len(files["queries"]), "corpus": len(files["corpus"])}
            if build:
                build_dataset(folder, os.path.join(staging, split), tokenizer=tokenizer,
                              max_lengths=max_lengths)
        with open(os.path.join(staging, "adapt_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def summary(report: dict) -> str:
    lines = []
    for split, recs in report["records"].items():
        lines.append(f"{split}: {report['documents'][split]} documents, "
                     f"{report['passages'][split]} passages -> "
                     + ", ".join(f"{k} {v}" for k, v in recs.items()))
    for task, n in report.get("retrieval", {}).items():
        lines.append(f"held-out retrieval {task}: {n['queries']} queries over {n['corpus']} "
                     f"passages")
    if report["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    for why, ids in report["skipped_documents"].items():
        if ids:
            more = f" (+{len(ids) - 5} more, see adapt_report.json)" if len(ids) > 5 else ""
            lines.append(f"documents skipped ({why}): {', '.join(ids[:5])}{more}")
    return "\n".join(lines)
