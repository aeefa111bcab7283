"""Tokenizers behind one interface: SentencePiece ``tokenizer.model`` and Hugging Face
``tokenizer.json``.

Both report, for every token, the character offset where it starts, so formats can compute
exact instruction/text/assistant spans from one tokenisation of the whole formatted string
(rather than tokenising the instruction separately and hoping the lengths add up).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.resources
import json
import os
import shutil
from typing import Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as _Tok

from grit_jax.data.formats import CHAT_TEMPLATE

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


class Tokenizer:
    """Common interface. Subclasses set the ids and implement ``_encode_offsets`` / ``decode``."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int
    kind: str

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of text, optionally wrapped in BOS/EOS."""
        return self.encode_spans([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of text and the character offset at which each token starts."""
        return self._encode_offsets(text)

    def encode_spans(self, pieces: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> tuple[list[int], list[int]]:
        """Tokenise ``"".join(pieces)`` once; return ids and, per token, the piece it starts in.

        BOS (if added) is assigned to piece 0, EOS (if added) to the last piece.
        """
        text = "".join(pieces)
        ids, starts = self._encode_offsets(text)
        bounds, acc = [], 0
        for p in pieces[:-1]:
            acc += len(p)
            bounds.append(acc)
        owner = [bisect.bisect_right(bounds, s) for s in starts]
        if add_bos:
            self._require("bos_id")
            ids, owner = [self.bos_id] + ids, [0] + owner
        if add_eos:
            self._require("eos_id")
            ids, owner = ids + [self.eos_id], owner + [len(pieces) - 1]
        return ids, owner

    def _require(self, name):
        if getattr(self, name) is None:
            raise ValueError(f"{self.path}: this tokenizer defines no "
                             f"{name.replace('_id', '')} token")

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, directory: str) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Mistral / Llama-2 ``tokenizer.model``)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        # No pad token in Mistral/Llama: pad with EOS, as the reference does (always masked).
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def _encode_offsets(self, text):
        proto = self.sp.encode(text, return_type="proto")
        ids = [p.id for p in proto.pieces]
        begins = np.fromiter((p.begin for p in proto.pieces), np.int64, len(ids))
        # SentencePiece offsets are UTF-8 byte offsets: each byte's character is the count of
        # character-starting (non-continuation) bytes up to it, minus one.
        raw = np.frombuffer(text.encode("utf-8"), np.uint8)
        char_of = np.append(np.cumsum((raw & 0xC0) != 0x80) - 1, len(text))
        return ids, char_of[np.minimum(begins, len(raw))].tolist()

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        dst = os.path.join(directory, SP_FILE)
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        piece = self.sp.id_to_piece
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": piece(self.bos_id) if self.bos_id is not None else None,
            "eos_token": piece(self.eos_id) if self.eos_id is not None else None,
            "unk_token": piece(self.sp.unk_id()),
            "pad_token": None,
            "add_bos_token": self.bos_id is not None,
            "add_eos_token": False,
            "legacy": True,
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
            "chat_template": CHAT_TEMPLATE,
        }
        special = {k: v for k, v in cfg.items()
                   if k in ("bos_token", "eos_token", "unk_token") and v}
        return [dst, _write_json(directory, HF_CONFIG_FILE, cfg),
                _write_json(directory, SPECIAL_MAP_FILE, special)]


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (Llama-3, SmolLM, ...), through the ``tokenizers``
    library."""

    kind = "huggingface"

    def __init__(self, path: str):
        self.path = path
        try:
            self.tok = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        cfg_path = os.path.join(os.path.dirname(path), HF_CONFIG_FILE)
        self.config = {}
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                self.config = json.load(f)

        def token_id(field):
            tok = self.config.get(field)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return None if tok is None else self.tok.token_to_id(tok)

        self.bos_id = token_id("bos_token") if self.config.get("add_bos_token", True) else None
        self.eos_id = token_id("eos_token")
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _encode_offsets(self, text):
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [o[0] for o in enc.offsets]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        dst = os.path.join(directory, HF_FILE)
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        files = [dst]
        src_cfg = os.path.join(os.path.dirname(self.path), HF_CONFIG_FILE)
        if os.path.exists(src_cfg) and os.path.abspath(src_cfg) != os.path.abspath(
                os.path.join(directory, HF_CONFIG_FILE)):
            shutil.copyfile(src_cfg, os.path.join(directory, HF_CONFIG_FILE))
            files.append(os.path.join(directory, HF_CONFIG_FILE))
        return files


def _write_json(directory, name, obj):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a file or a directory holding ``tokenizer.json`` or ``tokenizer.model``."""
    if os.path.isdir(path):
        for name, cls in ((HF_FILE, HFTokenizer), (SP_FILE, SentencePieceTokenizer)):
            if os.path.exists(os.path.join(path, name)):
                return cls(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no {HF_FILE} or {SP_FILE} in this directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: tokenizer file does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def default_tokenizer_path() -> str:
    """Path of the bundled Mistral-7B-v0.1 SentencePiece model (Apache-2.0, see assets/NOTICE)."""
    return str(importlib.resources.files("grit_jax") / "assets" / "mistral_tokenizer.model")


def default_tokenizer() -> SentencePieceTokenizer:
    """The real Mistral-7B tokenizer shipped with grit_jax (vocab 32000, bos=1, eos=2)."""
    return SentencePieceTokenizer(default_tokenizer_path())


def tokenizer_fingerprint(tok: Tokenizer) -> dict:
    """Identity of the tokenizer a dataset was built with (checked when training reads it)."""
    with open(tok.path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"kind": tok.kind, "file": os.path.basename(tok.path), "sha256": digest,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id}
