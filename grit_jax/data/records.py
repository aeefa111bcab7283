"""GRIT JSONL records: parsing and validation with errors that name the file, line and field.

Embedding records:  ``{"query": Q, "pos": [P, ...], "neg": [P, ...]}`` where each Q/P is a string
or an ``[instruction, text]`` pair (``neg`` may be absent or empty).
Generative records: ``{"text": "..."}`` (plain text, every token trained),
``{"text": [user, assistant, user, assistant, ...]}`` or
``{"messages": [{"role": "user" | "assistant", "content": "..."}, ...]}`` (assistant turns trained),
optionally with ``"context": "..."``: a document the chat follows in the embedding format, as in
GRIT's doc-cached RAG (``formats.encode_chat``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterator

EMBEDDING, GENERATIVE = "embedding", "generative"


class RecordError(ValueError):
    """A bad input record: ``file:line: field: problem``."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str,
                 reason: str):
        self.path, self.line, self.field = path, line, field
        self.problem, self.reason = problem, reason
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {field + ': ' if field else ''}{problem}")


@dataclasses.dataclass
class SkipCounter:
    """Counts of skipped records per reason; skipping happens only when ``enabled``."""

    enabled: bool = False
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def handle(self, err: RecordError) -> None:
        """Re-raise err unless skipping is enabled, in which case count it."""
        if not self.enabled:
            raise err
        self.counts[err.reason] += 1

    def total(self) -> int:
        return sum(self.counts.values())


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error, not 'the last one wins'."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _decode_error(path: str, n: int, line: str, e: json.JSONDecodeError) -> RecordError:
    """Malformed JSON, with a hint when the file is a JSON array or pretty-printed JSON."""
    problem = f"malformed JSON ({e.msg} at column {e.colno})"
    if line.strip() in ("[", "{") or (n == 1 and line.lstrip().startswith("[")):
        problem += ("; this looks like a JSON array or indented JSON, but JSONL needs one JSON "
                    "object per line (e.g. jq -c '.[]' in.json > out.jsonl)")
    return RecordError(path, n, None, problem, "malformed_json")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | RecordError]]:
    """(line number, JSON object or the RecordError for that line); blank lines are not records,
    a UTF-8 byte-order mark is allowed at the start, a key given twice in a record is an error."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, RecordError(path, n, None, f"not valid UTF-8 ({e.reason} at byte "
                                                    f"{e.start})", "non_utf8")
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_no_duplicates)
            except _DuplicateKey as e:
                yield n, RecordError(path, n, e.key, "given twice in this record (which one is "
                                                     "meant?)", "duplicate_key")
                continue
            except json.JSONDecodeError as e:
                yield n, _decode_error(path, n, line, e)
                continue
            if not isinstance(obj, dict):
                yield n, RecordError(path, n, None, f"expected a JSON object, got "
                                                    f"{type(obj).__name__}", "wrong_type")
                continue
            yield n, obj


def kind_of(obj: dict) -> str | None:
    """embedding / generative / None from the keys of a record."""
    if "query" in obj:
        return EMBEDDING
    if "text" in obj or "messages" in obj:
        return GENERATIVE
    return None


def _pair(value, path, line, field) -> list[str]:
    """A string -> ["", text]; an [instruction, text] pair -> itself; else a RecordError."""
    if isinstance(value, str):
        pair = ["", value]
    elif (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        pair = list(value)
    else:
        raise RecordError(path, line, field, "expected a string or an [instruction, text] pair of "
                                             f"strings, got {json.dumps(value)[:60]}", "wrong_type")
    if not pair[1].strip():
        raise RecordError(path, line, field, "empty text", "empty_field")
    return pair


def parse_embedding(obj: dict, path: str, line: int) -> dict:
    """Normalised ``{"query": [instr, text], "pos": [[instr, text], ...], "neg": [...]}``."""
    if "query" not in obj:
        raise RecordError(path, line, "query", "missing", "missing_field")
    query = _pair(obj["query"], path, line, "query")
    out = {"query": query}
    for field, required in (("pos", True), ("neg", False)):
        value = obj.get(field, [] if not required else None)
        if value is None:
            raise RecordError(path, line, field, "missing", "missing_field")
        if not isinstance(value, list):
            raise RecordError(path, line, field, f"expected a list, got {type(value).__name__}",
                              "wrong_type")
        if required and not value:
            raise RecordError(path, line, field, "empty list (every query needs a positive)",
                              "empty_pos")
        out[field] = [_pair(v, path, line, f"{field}[{i}]") for i, v in enumerate(value)]
    return out


def parse_generative(obj: dict, path: str, line: int) -> dict:
    """Normalised ``{"messages": [...]}`` (alternating user/assistant; ``context`` kept) or
    ``{"text": str}``."""
    if "context" in obj and "messages" not in obj:
        raise RecordError(path, line, "context", "a context goes with messages, not text",
                          "wrong_type")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(path, line, "messages", "expected a non-empty list",
                              "empty_field" if isinstance(msgs, list) else "wrong_type")
        turns = []
        for i, m in enumerate(msgs):
            f = f"messages[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise RecordError(path, line, f, "expected {\"role\": ..., \"content\": str}",
                                  "wrong_type")
            if m.get("role") not in ("user", "assistant"):
                raise RecordError(path, line, f + ".role", f"unsupported role {m.get('role')!r} "
                                                           "(user or assistant)", "wrong_type")
            turns.append((m["role"], m["content"]))
    else:
        text = obj["text"]
        if isinstance(text, str):
            if not text.strip():
                raise RecordError(path, line, "text", "empty text", "empty_field")
            return {"text": text}
        if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
            raise RecordError(path, line, "text", "expected a string or a non-empty list of "
                                                  "alternating user/assistant strings",
                              "wrong_type")
        turns = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(text)]
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(path, line, f"turn {i}", f"expected a {expected} turn, got {role}",
                              "wrong_type")
        if role == "assistant" and not content.strip():
            raise RecordError(path, line, f"turn {i}", "empty assistant turn", "empty_field")
    if turns[-1][0] != "assistant":
        raise RecordError(path, line, f"turn {len(turns) - 1}", "a chat must end with an "
                                                                 "assistant turn", "wrong_type")
    out = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if "context" in obj:
        if not isinstance(obj["context"], str) or not obj["context"].strip():
            raise RecordError(path, line, "context", "expected a non-empty string",
                              "wrong_type" if not isinstance(obj["context"], str)
                              else "empty_field")
        out["context"] = obj["context"]
    return out


def read_records(path: str, skips: SkipCounter) -> tuple[str, list[tuple[int, dict]]]:
    """(kind, [(line, normalised record)]) of one JSONL file; one kind per file."""
    kind, out = None, []
    for line, obj in iter_jsonl(path):
        try:
            if isinstance(obj, RecordError):
                raise obj
            k = kind_of(obj)
            if k is None:
                raise RecordError(path, line, None, "neither an embedding record (query/pos/neg) "
                                                    "nor a generative one (text or messages)",
                                  "missing_field")
            if kind is None:
                kind = k
            elif k != kind:
                raise RecordError(path, line, None, f"a {k} record in a file of {kind} records "
                                                    "(one kind per file)", "mixed_kinds")
            parse = parse_embedding if k == EMBEDDING else parse_generative
            out.append((line, parse(obj, path, line)))
        except RecordError as e:
            skips.handle(e)
    if not out:
        skips.handle(RecordError(path, None, None, "no valid records (empty file?)", "empty_file"))
    return kind, out


def write_jsonl(directory: str, files: dict[str, list[dict]]) -> None:
    """{name: records} as ``directory/<name>.jsonl``, one JSON object per line (UTF-8)."""
    os.makedirs(directory, exist_ok=True)
    for name, recs in files.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def list_jsonl(directory: str) -> list[str]:
    """The *.jsonl files of a folder, sorted; a folder without any is an error."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.endswith(".jsonl"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.jsonl files in this folder")
    return files
