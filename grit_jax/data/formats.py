"""GRIT text formats and their exact token spans (pooling masks, loss masks).

Embedding:  ``<s><|user|>\\n{instruction}\\n<|embed|>\\n{text}``  or  ``<s><|embed|>\\n{text}``
Chat:       ``<s><|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>`` with turns joined by ``\\n``

The ``<|...|>`` markers are plain text. ``<s>``/``</s>`` are the tokenizer's BOS/EOS ids.
Spans come from one tokenisation of the formatted string (``Tokenizer.encode_spans``), so the
instruction/text boundary is exact; the reference instead counts the instruction's tokens
separately, which agrees for the embedding format (the prefix ends in a newline, a token of its
own) but drifts by about one token per turn in multi-turn chats.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: tokenizers.py imports CHAT_TEMPLATE from here
    from grit_jax.data.tokenizers import Tokenizer

USER = "<|user|>\n"
EMBED = "<|embed|>\n"
ASSISTANT = "<|assistant|>\n"
INSTRUCTION_STRIP = "\t\n :"

# The chat format as a Hugging Face chat template, written into exported tokenizer configs so
# `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` builds GRIT prompts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def embed_instruction(instruction: str = "") -> str:
    """The embedding prefix for an instruction (the reference's ``gritlm_instruction``).

    Surrounding tabs, newlines, spaces and colons are stripped from the instruction, as GRIT
    training does. An already formatted prefix (ending in ``<|embed|>\n``) is returned as is.
    """
    instruction = instruction or ""
    if instruction.endswith(EMBED):  # already formatted, e.g. by the reference's helper
        return instruction
    instruction = instruction.strip(INSTRUCTION_STRIP)
    return f"{USER}{instruction}\n{EMBED}" if instruction else EMBED


class InstructionTooLong(ValueError):
    """The instruction alone fills max_length, leaving no room for text."""

    def __init__(self, where: str, n_prefix: int, max_length: int):
        self.detail = (f"the instruction takes {n_prefix} tokens, which leaves no room for text "
                       f"within max_length={max_length}; shorten the instruction or raise "
                       "max_length")
        super().__init__(f"{where or 'input'}: {self.detail}")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids with a per-token 0/1 mask (pooling mask for embeddings, loss mask for chats)."""

    ids: np.ndarray
    mask: np.ndarray
    cut: int = 0  # tokens removed from the end by a max_length
    context: int = 0  # leading tokens that are a chat's cached document (``context``)

    def __len__(self):
        return len(self.ids)


def encode_embed(tok: Tokenizer, text: str, instruction: str = "", *, max_length: int | None = None,
                 embed_eos: str = "", where: str = "") -> Encoded:
    """Tokenise one text for embedding; the mask is 1 on text tokens only (BOS+instruction are 0).

    Truncation (``max_length``) removes text tokens from the end and never the instruction: an
    instruction that leaves no room for text is an error (``where`` names the input in it).
    """
    prefix = embed_instruction(instruction)
    ids, owner = tok.encode_spans([prefix, text], add_bos=tok.bos_id is not None)
    if embed_eos:
        eos = tok.token_to_id(embed_eos)
        if eos is None:
            raise ValueError(f"embed_eos={embed_eos!r} is not a token of {tok.path}")
        ids, owner = ids + [eos], owner + [1]
    ids, mask = np.asarray(ids, np.int32), (np.asarray(owner) == 1).astype(np.int32)
    if max_length is not None and len(ids) > max_length:
        n_prefix = int((mask == 0).sum())
        if n_prefix >= max_length:
            raise InstructionTooLong(where, n_prefix, max_length)
        return Encoded(ids[:max_length], mask[:max_length], cut=len(ids) - max_length)
    return Encoded(ids, mask)


def normalize_messages(chat) -> list[dict]:
    """Accept a string (one user turn), alternating [user, assistant, ...] strings, or role
    dicts."""
    if isinstance(chat, str):
        return [{"role": "user", "content": chat}]
    messages = []
    for i, m in enumerate(chat):
        if isinstance(m, str):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": m})
        elif isinstance(m, dict) and "role" in m and "content" in m:
            if m["role"] not in ("user", "assistant"):
                raise ValueError(f"message {i}: role {m['role']!r} is not supported "
                                 f"(expected 'user' or 'assistant')")
            messages.append({"role": m["role"], "content": m["content"]})
        else:
            raise ValueError(f"message {i}: expected a string or a {{'role', 'content'}} dict, "
                             f"got {type(m).__name__}")
    return messages


def encode_chat(tok: Tokenizer, chat, *, add_generation_prompt: bool = False,
                context: str | None = None) -> Encoded:
    """Tokenise a chat in the GRIT format; the mask is 1 on assistant tokens and their ``</s>``.

    Text between two EOS tokens is tokenised as its own run, exactly as Hugging Face's
    Mistral/Llama tokenizer treats text after a special token. ``context``: the chat follows a
    document in the embedding format, ``<s><|embed|>\n{context}\n<|user|>...``, the tokens GRIT's
    doc-cached RAG reads (the document's cached prefix, then the prompt after it).
    """
    messages = normalize_messages(chat)
    runs: list[list[tuple[str, int]]] = [[]]  # runs of (piece, is_assistant), split at EOS
    for i, m in enumerate(messages):
        sep = "\n" if i or context is not None else ""
        if m["role"] == "user":
            runs[-1].append((f"{sep}{USER}{m['content']}\n", 0))
        else:
            if i == 0 or messages[i - 1]["role"] != "user":
                runs[-1].append((f"{sep}", 0))
            runs[-1].append((ASSISTANT, 0))
            runs[-1].append((m["content"], 1))
            runs.append([])  # EOS closes the assistant turn
    if add_generation_prompt:
        runs[-1].append((ASSISTANT, 0))
    ids: list[int] = [tok.bos_id] if tok.bos_id is not None else []
    if context is not None:  # the cached prefix is tokenised on its own, as RAG does
        ids = [int(i) for i in encode_embed(tok, context).ids]
    n_context = len(ids) if context is not None else 0
    mask: list[int] = [0] * len(ids)
    for r, run in enumerate(runs):
        pieces = [p for p, _ in run if p]
        flags = [f for p, f in run if p]
        if pieces:
            run_ids, owner = tok.encode_spans(pieces)
            ids += run_ids
            mask += [flags[o] for o in owner]
        if r < len(runs) - 1:
            tok._require("eos_id")
            ids.append(tok.eos_id)
            mask.append(1)
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32),
                   context=n_context)


def encode_text(tok: Tokenizer, text: str) -> Encoded:
    """A plain generative sample ``<s>{text}</s>``: every token after BOS carries loss."""
    ids = tok.encode(text, add_bos=tok.bos_id is not None, add_eos=True)
    mask = [0 if tok.bos_id is not None and i == 0 else 1 for i in range(len(ids))]
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def pad_batch(encoded: Sequence[Encoded], length: int, pad_id: int):
    """Right-pad to (B, length): ids, valid (attention) mask and the per-token mask."""
    b = len(encoded)
    ids = np.full((b, length), pad_id, np.int32)
    valid = np.zeros((b, length), bool)
    mask = np.zeros((b, length), np.int32)
    for i, e in enumerate(encoded):
        n = len(e)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the padded length {length}")
        ids[i, :n], valid[i, :n], mask[i, :n] = e.ids, True, e.mask
    return ids, valid, mask


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (static shapes: one compiled program per bucket)."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def length_buckets(max_length: int, smallest: int = 16, per_octave: int = 1) -> list[int]:
    """Padded lengths from ``smallest`` up to, and ending at, max_length: powers of two, split
    into ``per_octave`` equal steps (4: ..., 256, 320, 384, 448, 512, ...; padding <= 25%)."""
    out, b = [], smallest
    while b < max_length:
        out.extend(x for x in range(b, 2 * b, max(b // per_octave, 1)) if x < max_length)
        b *= 2
    return out + [max_length]
