"""Tokenizers (SentencePiece and tokenizer.json) against SentencePiece and transformers;
chat spans."""

import numpy as np
import pytest

from grit_jax.data import formats
from grit_jax.data.tokenizers import HFTokenizer, default_tokenizer, load_tokenizer

STRINGS = ["Hello world", "<|user|>\nRetrieve é日本 docs\n<|embed|>\nHello", " leading", "",
           "tabs\tand  double  spaces\n\nnewlines", "emoji 🙂 and accents àéîõü"]


@pytest.fixture(scope="module")
def hf_tok(mistral_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mistral_dir)


def test_sentencepiece_matches_sentencepiece_and_transformers(tokenizer, hf_tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    for s in STRINGS:
        assert tokenizer.encode(s) == sp.encode(s)
        assert tokenizer.encode(s, add_bos=True) == hf_tok(s)["input_ids"]
        assert tokenizer.decode(tokenizer.encode(s)) == sp.decode(sp.encode(s))


def test_tokenizer_json_matches_transformers(tmp_path, hf_tok):
    """A tokenizer.json written by transformers reads through the `tokenizers` backend."""
    hf_tok.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for s in STRINGS:
        assert tok.encode(s, add_bos=True) == hf_tok(s)["input_ids"], s
    for instruction in ["Retrieve passages", ""]:
        a = formats.encode_embed(tok, "Paris is in France.", instruction)
        b = formats.encode_embed(default_tokenizer(), "Paris is in France.", instruction)
        assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()


def test_spans_follow_characters(tokenizer):
    ids, owner = tokenizer.encode_spans(["<|embed|>\n", "日本 text"], add_bos=True)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    first_text = owner.index(1)
    assert pieces[0] == "<s>" and owner[0] == 0
    assert pieces[first_text - 1] == "<0x0A>"
    assert tokenizer.decode(ids[first_text:]) == "日本 text"


def test_offsets_are_character_offsets(tokenizer):
    """Each token's start as a character index, multi-byte characters and byte pieces included
    (SentencePiece reports UTF-8 byte offsets)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
    for s in STRINGS + ["\u00e9" * 3 + " \U0001f642\U0001f642 x"]:
        ids, starts = tokenizer.encode_with_offsets(s)
        raw = s.encode("utf-8")
        # the character holding each start byte: complete characters before it
        want = [len(raw[:p.begin].decode("utf-8", "ignore"))
                for p in sp.encode(s, return_type="proto").pieces]
        assert ids == sp.encode(s) and starts == want, s


CHAT = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def test_chat_matches_transformers_on_the_formatted_string(tokenizer, hf_tok):
    enc = formats.encode_chat(tokenizer, CHAT)
    text = ("<|user|>\nHi there\n<|assistant|>\nHello! How can I help?</s>\n"
            "<|user|>\nName a colour.\n<|assistant|>\nBlue.</s>")
    assert enc.ids.tolist() == hf_tok(text)["input_ids"]
    prompt = formats.encode_chat(tokenizer, "Hi there", add_generation_prompt=True)
    assert prompt.ids.tolist() == hf_tok("<|user|>\nHi there\n<|assistant|>\n")["input_ids"]
    assert prompt.mask.sum() == 0


def test_chat_loss_mask_is_exactly_assistant_tokens_and_eos(tokenizer):
    enc = formats.encode_chat(tokenizer, CHAT)
    ids, mask = enc.ids.tolist(), enc.mask.tolist()
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [s[-1] for s in spans] == [tokenizer.eos_id] * 2
    assert [tokenizer.decode(s[:-1]) for s in spans] == ["Hello! How can I help?", "Blue."]
    # Plain alternating strings are the same chat.
    alt = formats.encode_chat(tokenizer, [m["content"] for m in CHAT])
    assert alt.ids.tolist() == ids and alt.mask.tolist() == mask


def test_chat_after_a_context_is_what_doc_cached_rag_reads(tokenizer):
    """A chat with a context: the document's embedding-format prefix (as RAG caches it), then the
    prompt RAG puts after a cached document; loss on the answer only."""
    from grit_jax.rag import prompts

    doc, query, answer = "Tides are caused by the Moon.", "What causes tides?", "The Moon."
    turn = f"{query}\n\n{prompts.DOC_FIRST}"
    prefix = formats.encode_embed(tokenizer, doc).ids.tolist()
    read = prefix + tokenizer.encode(prompts.after_cache("doc", query, [doc]))
    prompt = formats.encode_chat(tokenizer, turn, add_generation_prompt=True, context=doc)
    assert prompt.ids.tolist() == read and prompt.mask.sum() == 0
    assert prompt.context == len(prefix)  # the tokens the cache holds
    full = formats.encode_chat(tokenizer, [turn, answer], context=doc)
    assert full.context == len(prefix)
    assert full.ids.tolist()[:len(read)] == read
    assert tokenizer.decode(full.ids[full.mask == 1][:-1]) == answer
    assert full.ids[-1] == tokenizer.eos_id


def test_bad_chat_input(tokenizer):
    with pytest.raises(ValueError, match="message 1: role 'system' is not supported"):
        formats.encode_chat(tokenizer, [{"role": "user", "content": "a"},
                                        {"role": "system", "content": "b"}])
    with pytest.raises(ValueError, match="message 0: expected a string"):
        formats.encode_chat(tokenizer, [3])


def test_pad_and_buckets():
    enc = [formats.Encoded(np.array([1, 5, 6], np.int32), np.array([0, 1, 1], np.int32)),
           formats.Encoded(np.array([1], np.int32), np.array([0], np.int32))]
    ids, valid, mask = formats.pad_batch(enc, 4, pad_id=2)
    assert ids.tolist() == [[1, 5, 6, 2], [1, 2, 2, 2]]
    assert valid.sum() == 4 and mask.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert formats.length_buckets(100) == [16, 32, 64, 100]
    assert formats.length_buckets(512, 256, per_octave=4) == [256, 320, 384, 448, 512]
    assert formats.length_buckets(100, 16, per_octave=2) == [16, 24, 32, 48, 64, 96, 100]
    assert formats.bucket_length(33, [16, 32, 64]) == 64
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        formats.bucket_length(65, [16, 32, 64])


def test_exported_chat_template_builds_grit_prompts(tmp_path, tokenizer):
    """transformers' apply_chat_template on an exported tokenizer gives our chat tokens."""
    from transformers import AutoTokenizer

    tokenizer.save(str(tmp_path))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for chat in (CHAT[:1], CHAT[:3]):
        ours = formats.encode_chat(tokenizer, chat, add_generation_prompt=True).ids.tolist()
        theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        theirs = (theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys")
                  else theirs)
        assert list(theirs) == ours
    full = hf_tok.apply_chat_template(CHAT, tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert list(full) == formats.encode_chat(tokenizer, CHAT).ids.tolist()
