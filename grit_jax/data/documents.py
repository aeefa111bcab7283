"""A folder of documents as titled sections of passages: plain text, Markdown, reStructuredText
and JSONL (one document per line: ``{"text": ..., "title": ..., "id": ...}``).

Each document keeps its title (the first heading, else the first short line, else the file
name), its sections (a heading and the paragraphs under it) and its passages (paragraphs merged
or split at sentence ends to about ``passage_words`` words). Code blocks, directives and markup
are dropped; what is left is prose. Files of other types are skipped and counted; a file that
is not UTF-8 or a bad JSONL line is a :class:`~grit_jax.data.records.RecordError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from grit_jax.data.records import RecordError, SkipCounter

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
            ".rst": "rst", ".rst.txt": "rst", ".jsonl": "jsonl"}  # .rst.txt: Sphinx's _sources


def kind_of(path: str) -> str | None:
    """The document type of a file name, or None."""
    name = os.path.basename(path).lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return SUFFIXES[suffix]
    return None
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")


@dataclasses.dataclass(frozen=True)
class Section:
    heading: str | None
    passages: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Document:
    id: str  # the file relative to the input folder (``file.jsonl:line`` for JSONL documents)
    title: str | None  # None: a JSONL document with neither a title nor a heading
    sections: tuple[Section, ...]

    @property
    def passages(self) -> list[str]:
        return [p for s in self.sections for p in s.passages]


def words(text: str) -> int:
    return len(text.split())


def sentences(text: str) -> list[str]:
    """Sentences of a passage: split after . ! ? before a capital letter or a digit."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _inline(text: str) -> str:
    """Markup inside a line to plain text: links, emphasis, code spans, rst roles, HTML tags."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [text](url)
    text = re.sub(r":[\w:.+-]+:`~?([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", text)  # :role:`target`
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)  # `text <url>`_
    text = re.sub(r"`+([^`]+)`+_?", r"\1", text)  # ``code``, `code`, `ref`_
    text = re.sub(r"</?[A-Za-z][^>]*>", "", text)  # HTML tags
    text = re.sub(r"(\*\*|__|\*)(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis
    text = re.sub(r"(?<=\s)---?(?=\s)", "\u2014", text)  # rst/Markdown dashes
    return " ".join(text.split())


def _markdown_blocks(text: str):
    """(heading, [paragraph, ...]) per section of a Markdown text."""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # front matter
    heading, paras, para, fence = None, [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        m = re.match(r"^(```+|~~~+)", stripped)
        if fence or m:  # fenced code: not prose
            if fence is None:
                fence = m.group(1)[:3]
            elif stripped.startswith(fence):
                fence = None
            para = _flush(paras, para)
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*$", stripped)
        if m:
            para = _flush(paras, para)
            yield heading, paras
            heading, paras = _inline(m.group(2)), []
        elif not stripped or line.startswith(("    ", "\t")) or stripped.startswith("|"):
            para = _flush(paras, para)  # blank line, indented code, table row
        else:
            para.append(re.sub(r"^(>\s*)+|^([-*+]|\d+[.)])\s+", "", stripped))
    _flush(paras, para)
    yield heading, paras


# Directives whose argument names what their body describes (an API entry): a section each.
_RST_SIGNATURES = frozenset("""function method class attribute data exception decorator
decoratormethod classmethod staticmethod abstractmethod coroutinefunction coroutinemethod
property macro type member var struct union enum enumerator opcode option cmdoption describe
envvar pdbcommand object term""".split())
# Directives whose body is prose in the section it stands in (the rest are skipped as code,
# tables, indices or markup).
_RST_PROSE = frozenset("""note warning seealso versionadded versionchanged deprecated
deprecated-removed admonition tip important caution attention danger error hint impl-detail
glossary topic sidebar centered""".split())


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _rst_blocks(text: str):
    """(heading, [paragraph, ...]) per section of a reStructuredText text: section titles and
    API entries (``.. function:: name(args)``) start sections; admonitions keep their prose;
    literal blocks, doctests, code and other directives are dropped."""
    lines = text.expandtabs(8).splitlines()
    heading, paras, para = None, [], []
    skip_deeper = None  # skipping a block: blank lines and lines indented deeper than this
    header = False  # a directive's argument/option lines, up to the first blank line
    entry = None  # inside an API entry's body: lines indented deeper than this
    i = 0
    while i < len(lines):
        stripped, ind = lines[i].strip(), _indent(lines[i])
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        i += 1
        if header:
            header = bool(stripped)
            continue
        if skip_deeper is not None:
            if not stripped or ind > skip_deeper:
                continue
            skip_deeper = None
        if entry is not None and stripped and ind <= entry:  # the entry's body ended
            para = _flush(paras, para)
            yield heading, paras
            heading, paras, entry = None, [], None
        if (stripped and ind == 0 and not _RST_UNDERLINE.match(stripped)
                and _RST_UNDERLINE.match(nxt) and len(nxt) >= len(stripped)):
            para = _flush(paras, para)
            yield heading, paras
            heading, paras, entry = _inline(stripped), [], None
            i += 1
            continue
        if not stripped or _RST_UNDERLINE.match(stripped):
            para = _flush(paras, para)
            continue
        m = re.match(r"^\.\.\s+(?:[\w-]+:)?([\w-]+)::\s*(.*)$", stripped)
        if m:
            para = _flush(paras, para)
            name, arg = m.group(1), m.group(2)
            if name in _RST_SIGNATURES:
                yield heading, paras
                heading, paras, entry = _inline(arg) or None, [], ind
                header = True
            elif name in _RST_PROSE:
                header = True
            else:
                skip_deeper = ind
            continue
        if stripped.startswith(".. ") or stripped == "..":  # comment, target, substitution
            para = _flush(paras, para)
            skip_deeper = ind
            continue
        if re.match(r"^:[\w -]+:(\s|$)", stripped):  # a field or option line
            continue
        if stripped.startswith(">>>"):  # a doctest block runs to the next blank line
            para = _flush(paras, para)
            header = True
            continue
        if stripped.endswith("::"):  # the paragraph before a literal block
            lead = stripped[:-2].rstrip()
            if lead:
                para.append(lead if lead.endswith(":") else lead + ":")
            para = _flush(paras, para)
            skip_deeper = ind
            continue
        para.append(re.sub(r"^([-*+]|\d+[.)]|#\.)\s+", "", stripped))
    _flush(paras, para)
    yield heading, paras


def _text_blocks(text: str):
    paras, para = [], []
    for line in text.splitlines():
        if line.strip():
            para.append(line.strip())
        else:
            para = _flush(paras, para)
    _flush(paras, para)
    yield None, paras


def _flush(paras: list, para: list) -> list:
    if para:
        text = _inline(" ".join(para))
        if text:
            paras.append(text)
    return []


def _split_long(paragraph: str, max_words: int) -> list[str]:
    """A paragraph longer than max_words in pieces at sentence ends (a longer sentence at
    word boundaries)."""
    pieces, cur = [], []
    for s in sentences(paragraph):
        ws = s.split()
        while len(ws) > max_words:
            if cur:
                pieces.append(" ".join(cur))
                cur = []
            pieces.append(" ".join(ws[:max_words]))
            ws = ws[max_words:]
        if cur and len(cur) + len(ws) > max_words:
            pieces.append(" ".join(cur))
            cur = []
        cur.extend(ws)
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def passages_of(paragraphs: list[str], passage_words: int, min_words: int) -> list[str]:
    """Paragraphs merged (while under passage_words) or split into passages; a short remainder
    joins the passage before it, and a section shorter than min_words yields nothing."""
    out, cur = [], []
    for para in paragraphs:
        for piece in _split_long(para, passage_words):
            n = words(piece)
            if cur and words(" ".join(cur)) + n > passage_words:
                out.append(" ".join(cur))
                cur = []
            cur.append(piece)
    if cur:
        rest = " ".join(cur)
        if words(rest) < min_words and out and words(out[-1]) + words(rest) <= 2 * passage_words:
            out[-1] = out[-1] + " " + rest
        else:
            out.append(rest)
    return [p for p in out if words(p) >= min_words]


def _title_from_name(rel: str) -> str:
    stem = os.path.basename(rel)
    stem = (stem[:-len(".rst.txt")] if stem.lower().endswith(".rst.txt")
            else os.path.splitext(stem)[0])
    return " ".join(re.sub(r"[_\-]+", " ", stem).split()) or stem


def parse(doc_id: str, text: str, kind: str, *, title: str | None = None,
          passage_words: int = 120, min_words: int = 12, file_title: bool = True) -> Document:
    """One document from its text (``kind``: text, markdown or rst); ``file_title``: without a
    title or heading, the file name is the title."""
    blocks = {"markdown": _markdown_blocks, "rst": _rst_blocks, "text": _text_blocks}[kind]
    raw = [(h, ps) for h, ps in blocks(text) if h is not None or ps]
    if title is None and raw and raw[0][0] is not None:  # the first heading names the document
        title = raw[0][0]
        raw[0] = (None, raw[0][1])
    if title is None and kind == "text" and raw and raw[0][1]:
        first = raw[0][1][0]  # a short first line without a final stop is a title
        if words(first) <= 12 and not first.endswith((".", "!", "?", ":", ";", ",")):
            title, raw[0] = first, (None, raw[0][1][1:])
    if title is None and file_title:
        title = _title_from_name(doc_id)
    sections = []
    for heading, paras in raw:
        ps = passages_of(paras, passage_words, min_words)
        if ps:
            sections.append(Section(heading, tuple(ps)))
    return Document(doc_id, title, tuple(sections))


def list_files(root: str, skips: SkipCounter) -> list[tuple[str, str]]:
    """(path, path relative to root) of every document file under root, sorted; other files
    are skipped and counted (always: a documentation folder holds images and scripts too)."""
    if os.path.isfile(root):
        base = os.path.dirname(root)
        paths = [root]
    elif os.path.isdir(root):
        base, paths = root, []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            paths += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    else:
        raise FileNotFoundError(2, "No such file or directory", root)
    out = []
    for p in paths:
        if kind_of(p):
            out.append((p, os.path.relpath(p, base)))
        else:
            skips.counts["not a document type (" + (os.path.splitext(p)[1].lower() or
                                                     "no suffix") + ")"] += 1
    if not out:
        raise ValueError(f"{root}: no documents ({', '.join(sorted(SUFFIXES))}) found")
    return out


def read_documents(root: str, skips: SkipCounter, *, passage_words: int = 120,
                   min_words: int = 12) -> tuple[list[Document], list[str]]:
    """(documents with at least one passage, ids of the documents that had none). A file that
    is not UTF-8 or a bad JSONL line raises a RecordError naming it, or with ``skips.enabled``
    is skipped and counted."""
    docs, empty = [], []
    for path, rel in list_files(root, skips):
        kind = kind_of(path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            skips.handle(RecordError(path, line, None, f"not valid UTF-8 ({e.reason} at byte "
                                                       f"{e.start})", "non_utf8"))
            continue
        if kind == "jsonl":
            found = _jsonl_documents(path, rel, text, skips, passage_words, min_words)
        else:
            found = [parse(rel, text, kind, passage_words=passage_words, min_words=min_words)]
        docs += [d for d in found if d.sections]
        empty += [d.id for d in found if not d.sections]
    return docs, empty


def _jsonl_documents(path, rel, text, skips, passage_words, min_words):
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            skips.handle(RecordError(path, n, None, f"malformed JSON ({e.msg} at column "
                                                    f"{e.colno})", "malformed_json"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            skips.handle(RecordError(path, n, "text", "expected an object with a string "
                                                      "'text' (and optional 'title', 'id')",
                                     "missing_text"))
            continue
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            skips.handle(RecordError(path, n, "title", f"expected a string, got "
                                                       f"{type(title).__name__}", "wrong_type"))
            continue
        doc_id = f"{rel}:{obj['id']}" if "id" in obj else f"{rel}:{n}"
        out.append(parse(doc_id, obj["text"], "markdown", title=title or None,
                         passage_words=passage_words, min_words=min_words, file_title=False))
    return out
