"""Built datasets: tokens and masks token by token, metadata, instruction limits; formats fuzzed."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grit_jax.data import formats
from grit_jax.data.dataset import build, open_dataset

INSTR = "Given a question, retrieve an answer"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    src = tmp_path_factory.mktemp("src")
    (src / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"query": [INSTR, "Where is Paris?"], "pos": ["Paris is in France.", "It is French."],
         "neg": [["Represent the passage", "Rome is in Italy."]]},
        {"query": "No instruction here", "pos": ["A passage"], "neg": ["x", "y", "z"]},
    ]) + "\n")
    (src / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": ["Hi", "Hello there!", "Name a colour", "Blue."]},
        {"text": "Plain text sample."},
    ]) + "\n")
    out = tmp_path_factory.mktemp("out")
    build(str(src), str(out), max_lengths={"query": 64, "passage": 64, "generative": 64})
    builder, meta = open_dataset(str(out))
    return builder, meta


def by_line(source):
    return {int(source[i]["line"]): source[i] for i in range(len(source))}


def segments(ex):
    bounds = np.cumsum(ex["lengths"])[:-1]
    return list(zip(np.split(ex["tokens"], bounds), np.split(ex["masks"], bounds)))


def test_metadata(built):
    _, meta = built
    assert meta["datasets"]["qa"] == {"file": "qa.jsonl", "kind": "embedding", "examples": 2,
                                      "min_neg": 1, "tokens": meta["datasets"]["qa"]["tokens"],
                                      "context": 0, "truncated": {}}
    assert meta["datasets"]["chat"]["kind"] == "generative"
    assert meta["datasets"]["chat"]["context"] == 0  # chats that follow a cached document
    assert meta["tokenizer"]["vocab_size"] == 32000 and meta["skipped"] == {}


def test_embedding_masks_token_by_token(built, tokenizer):
    builder, meta = built
    ex = by_line(builder.as_data_source("qa"))[1]
    segs = segments(ex)
    assert int(ex["num_pos"]) == 2 and len(segs) == 4
    q_ids, q_mask = segs[0]
    # Ids are the tokenisation of the whole formatted string with BOS.
    prefix = f"<|user|>\n{INSTR}\n<|embed|>\n"
    assert q_ids.tolist() == tokenizer.encode(prefix + "Where is Paris?", add_bos=True)
    n_prefix = len(tokenizer.encode(prefix, add_bos=True))
    assert q_mask.tolist() == [0] * n_prefix + [1] * (len(q_ids) - n_prefix)
    assert tokenizer.decode(q_ids[q_mask == 1]) == "Where is Paris?"
    neg_ids, neg_mask = segs[3]
    assert tokenizer.decode(neg_ids[neg_mask == 1]) == "Rome is in Italy."
    assert (tokenizer.decode(neg_ids[neg_mask == 0][1:])
            == "<|user|>\nRepresent the passage\n<|embed|>\n")
    doc_ids, doc_mask = segs[1]
    assert tokenizer.decode(doc_ids[doc_mask == 0][1:]) == "<|embed|>\n"


def test_generative_masks_token_by_token(built, tokenizer):
    builder, _ = built
    rows = by_line(builder.as_data_source("chat"))
    ids, mask = segments(rows[1])[0]
    expected = formats.encode_chat(tokenizer, ["Hi", "Hello there!", "Name a colour", "Blue."])
    assert ids.tolist() == expected.ids.tolist() and mask.tolist() == expected.mask.tolist()
    # Loss exactly on the assistant turns and their EOS, nothing else: walk the token runs.
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur) if cur else None
    assert [tokenizer.decode(r[:-1]) for r in runs] == ["Hello there!", "Blue."]
    assert all(r[-1] == tokenizer.eos_id for r in runs)
    # Text after </s> starts a new SentencePiece run ("▁" dummy prefix), as transformers does.
    assert tokenizer.decode(ids[mask == 0][1:]) == (
        "<|user|>\nHi\n<|assistant|>\n \n<|user|>\nName a colour\n<|assistant|>\n")
    plain_ids, plain_mask = segments(rows[2])[0]
    assert plain_ids[0] == tokenizer.bos_id and plain_ids[-1] == tokenizer.eos_id
    assert plain_mask.tolist() == [0] + [1] * (len(plain_ids) - 1)


def test_truncation_and_instruction_limit(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    long_text = "word " * 200
    (src / "e.jsonl").write_text(json.dumps({"query": [INSTR, long_text], "pos": [long_text],
                                             "neg": ["n"]}) + "\n" +
                                 json.dumps({"query": ["very long instruction " * 20, "q"],
                                             "pos": ["p"], "neg": ["n"]}) + "\n")
    limits = {"query": 32, "passage": 48, "generative": 64}
    with pytest.raises(ValueError, match=r"e.jsonl:2: query: the instruction takes \d+ tokens"):
        build(str(src), str(tmp_path / "o1"), max_lengths=limits)
    builder = build(str(src), str(tmp_path / "o2"), max_lengths=limits, skip_invalid=True)
    assert dict(builder.info.metadata["skipped"]) == {"instruction_too_long": 1}
    ex = builder.as_data_source("e")[0]
    q, p, _ = segments(ex)
    assert len(q[0]) == 32 and len(p[0]) == 48
    n_prefix = len(tokenizer.encode(f"<|user|>\n{INSTR}\n<|embed|>\n", add_bos=True))
    assert int((q[1] == 0).sum()) == n_prefix  # the instruction is intact, the text was cut


@settings(max_examples=150, deadline=None)
@given(instruction=st.text(max_size=30), text=st.text(min_size=1, max_size=60))
def test_fuzz_embed_spans_are_exact(tokenizer, instruction, text):
    """The masked prefix is exactly the separately tokenised prefix; ids are the whole string's."""
    enc = formats.encode_embed(tokenizer, text, instruction)
    prefix = formats.embed_instruction(instruction)
    assert enc.ids.tolist() == tokenizer.encode(prefix + text, add_bos=True)
    n = int((enc.mask == 0).sum())
    assert enc.mask.tolist() == [0] * n + [1] * (len(enc) - n)
    assert n == len(tokenizer.encode(prefix, add_bos=True))


@settings(max_examples=100, deadline=None)
@given(turns=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=6))
def test_fuzz_chat_mask_covers_assistant_turns(tokenizer, turns):
    if len(turns) % 2:
        turns = turns + ["ok"]
    enc = formats.encode_chat(tokenizer, turns)
    assert int((np.asarray(enc.ids) == tokenizer.eos_id)[enc.mask == 1].sum()) == len(turns) // 2
    assert enc.mask[0] == 0 and enc.mask[-1] == 1
