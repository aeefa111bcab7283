"""Evaluation tasks read from files, and their evaluation with a ``GritLM``.

Kinds and their files (JSONL, one object per line; errors name ``file:line: field``):

- ``retrieval``: GRIT's embedding format, ``{"query": [instruction, text], "pos": [...],
  "neg": [...]}`` (the corpus is every pos/neg passage; pos are relevant), or a folder with
  ``queries.jsonl`` (``id``, ``text``, optional ``instruction``), ``corpus.jsonl`` (``id``,
  ``text``, optional ``title``) and ``qrels.jsonl`` (``query_id``, ``doc_id``, ``score``).
- ``sts``: ``{"sentence1", "sentence2", "score"}``.
- ``classification``: a folder with ``train.jsonl`` and ``test.jsonl`` of ``{"text", "label"}``.
- ``clustering``: ``{"text", "label"}``.
- ``generative``: GRIT's generative format (``{"messages": [...]}`` or ``{"text": ...}``); the
  loss covers what training would (assistant turns).
- ``adapted``: the output folder of ``python -m grit_jax.data adapt``: its held-out retrieval tasks
  (``retrieval/<task>``) and the held-out generative loss of its chat set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from grit_jax.data import formats
from grit_jax.data.records import RecordError, iter_jsonl, parse_embedding, parse_generative
from grit_jax.evaluation import metrics
from grit_jax.evaluation.generative import heldout_loss
from grit_jax.inference import document_text

TASK_KINDS = ("retrieval", "sts", "classification", "clustering", "generative", "adapted")


@dataclasses.dataclass
class Task:
    kind: str
    name: str
    data: dict


def _objects(path: str):
    """(line, JSON object) of a JSONL file; the first bad line raises its RecordError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    for line, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            raise obj
        yield line, obj


def _rows(path: str, fields: dict[str, type]) -> list[dict]:
    """The JSONL objects of a file, each checked to carry ``fields`` of the given types."""
    out = []
    for line, obj in _objects(path):
        for field, kind in fields.items():
            if field not in obj:
                raise RecordError(path, line, field, "missing", "missing_field")
            if not isinstance(obj[field], kind):
                raise RecordError(path, line, field, f"expected {getattr(kind, '__name__', kind)}, "
                                                     f"got {type(obj[field]).__name__}",
                                  "wrong_type")
        out.append(dict(obj, _line=line))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def _retrieval_grit(path: str) -> dict:
    queries, corpus, index, relevant = [], [], {}, []
    for line, obj in _objects(path):
        rec = parse_embedding(obj, path, line)
        rel = {}
        for field, grade in (("neg", 0.0), ("pos", 1.0)):
            for _, text in rec[field]:
                if text not in index:
                    index[text] = len(corpus)
                    corpus.append(text)
                rel[index[text]] = max(rel.get(index[text], 0.0), grade)
        queries.append({"instruction": rec["query"][0], "text": rec["query"][1]})
        relevant.append(rel)
    if not queries:
        raise ValueError(f"{path}: no records")
    return {"queries": queries, "corpus": corpus, "relevant": relevant}


def _retrieval_beir(folder: str) -> dict:
    q = _rows(os.path.join(folder, "queries.jsonl"), {"id": (str, int), "text": str})
    c = _rows(os.path.join(folder, "corpus.jsonl"), {"id": (str, int), "text": str})
    qrels_path = os.path.join(folder, "qrels.jsonl")
    qrels = _rows(qrels_path, {"query_id": (str, int), "doc_id": (str, int),
                               "score": (int, float)})
    doc_index = {str(d["id"]): i for i, d in enumerate(c)}
    q_index = {str(r["id"]): i for i, r in enumerate(q)}
    relevant = [{} for _ in q]
    for r in qrels:
        for field, table in (("query_id", q_index), ("doc_id", doc_index)):
            if str(r[field]) not in table:
                raise RecordError(qrels_path, r["_line"], field, f"unknown id {r[field]!r}",
                                  "unknown_id")
        relevant[q_index[str(r["query_id"])]][doc_index[str(r["doc_id"])]] = float(r["score"])
    keep = [i for i, rel in enumerate(relevant) if any(g > 0 for g in rel.values())]
    return {"queries": [{"instruction": q[i].get("instruction", ""), "text": q[i]["text"]}
                        for i in keep],
            "corpus": [document_text(d) for d in c],
            "relevant": [relevant[i] for i in keep], "queries_without_qrels": len(q) - len(keep)}


def _generative(path: str) -> dict:
    samples = []
    for line, obj in _objects(path):
        if "messages" not in obj and "text" not in obj:
            raise RecordError(path, line, "messages", "missing (or give text)", "missing_field")
        samples.append(parse_generative(obj, path, line))
    if not samples:
        raise ValueError(f"{path}: no records")
    return {"samples": samples}


LOADERS: dict[str, Callable[[str], dict]] = {
    "retrieval": lambda p: _retrieval_beir(p) if os.path.isdir(p) else _retrieval_grit(p),
    "sts": lambda p: {"pairs": _rows(p, {"sentence1": str, "sentence2": str,
                                         "score": (int, float)})},
    "classification": lambda p: {
        split: _rows(os.path.join(p, f"{split}.jsonl"), {"text": str, "label": (str, int)})
        for split in ("train", "test")},
    "clustering": lambda p: {"rows": _rows(p, {"text": str, "label": (str, int)})},
    "generative": _generative,
}


def _name_and_path(rest: str) -> tuple[str, str]:
    """``name=path`` or ``path`` (named after its file or folder, suffix dropped)."""
    name, eq, path = rest.partition("=")
    if not eq:
        return os.path.splitext(os.path.basename(rest.rstrip("/")))[0], rest
    return name, path


def load_tasks(spec: str) -> list[Task]:
    """``kind:path`` (or ``kind:name=path``) -> its tasks (one, or several for ``adapted``)."""
    kind, _, rest = spec.partition(":")
    if kind != "adapted":
        return [load_task(spec)]
    name, path = _name_and_path(rest)
    folder = os.path.join(path, "retrieval")
    chat = os.path.join(path, "jsonl", "eval", "adapt_chat.jsonl")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"task {spec!r}: {folder} does not exist (expected the output "
                                f"folder of python -m grit_jax.data adapt)")
    tasks = [load_task(f"retrieval:{name}/{t}={os.path.join(folder, t)}")
             for t in sorted(os.listdir(folder))]
    if os.path.exists(chat):
        tasks.append(load_task(f"generative:{name}/chat={chat}"))
    return tasks


def load_task(spec: str) -> Task:
    """``kind:path`` (or ``kind:name=path``) -> Task."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in TASK_KINDS or kind == "adapted":
        raise ValueError(f"task {spec!r}: expected KIND:PATH with KIND one of {TASK_KINDS}")
    name, path = _name_and_path(rest)
    if not os.path.exists(path):
        raise FileNotFoundError(f"task {spec!r}: {path} does not exist")
    return Task(kind, f"{kind}/{name}", LOADERS[kind](path))


def memo_key(texts, instruction: str = "", max_length: int | None = None) -> tuple:
    """The ``memo`` entry of evaluate_task for these texts embedded with this instruction and
    length (to hand it embeddings computed elsewhere, e.g. by a RAG index)."""
    return instruction, max_length, tuple(texts)


def evaluate_task(model, task: Task, *, instruction: str = "", batch_size: int = 16,
                  max_length: int | None = None, seed: int = 0,
                  memo: dict | None = None) -> dict:
    """The task's metrics for a GritLM (embedding tasks embed with its attention and pooling).

    ``memo``: a dict shared across calls with the same model, so tasks over one corpus (the
    held-out tasks of ``adapted``) embed it once.
    """
    d = task.data

    def enc(texts, instr=""):
        key = memo_key(texts, instr, max_length)
        if memo is not None and key in memo:
            return memo[key]
        out = model.encode(texts, instruction=instr, batch_size=batch_size, max_length=max_length)
        if memo is not None:
            memo[key] = out
        return out
    if task.kind == "retrieval":
        docs = enc(d["corpus"])
        q = np.zeros((len(d["queries"]), docs.shape[1]), np.float32)
        by_instruction: dict[str, list[int]] = {}
        for i, query in enumerate(d["queries"]):
            by_instruction.setdefault(instruction or query["instruction"], []).append(i)
        for instr, idx in by_instruction.items():
            q[idx] = enc([d["queries"][i]["text"] for i in idx], instr)
        out = metrics.retrieval_metrics(q @ docs.T, d["relevant"])
        return dict(out, queries=len(q), documents=len(docs))
    if task.kind == "sts":
        p = d["pairs"]
        out = metrics.sts_spearman(enc([r["sentence1"] for r in p], instruction),
                                   enc([r["sentence2"] for r in p], instruction),
                                   [r["score"] for r in p])
        return dict(out, pairs=len(p))
    if task.kind == "classification":
        tr, te = d["train"], d["test"]
        out = metrics.classification_accuracy(
            enc([r["text"] for r in tr], instruction), [r["label"] for r in tr],
            enc([r["text"] for r in te], instruction), [r["label"] for r in te], seed=seed)
        return dict(out, train=len(tr), test=len(te))
    if task.kind == "clustering":
        rows = d["rows"]
        out = metrics.clustering_v_measure(enc([r["text"] for r in rows], instruction),
                                           [r["label"] for r in rows], seed=seed)
        return dict(out, texts=len(rows), clusters=len({r["label"] for r in rows}))
    encoded = [formats.encode_chat(model.tokenizer, s["messages"]) if "messages" in s
               else formats.encode_text(model.tokenizer, s["text"]) for s in d["samples"]]
    return heldout_loss(model, encoded, batch_size=max(1, batch_size // 2))
