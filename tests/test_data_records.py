"""JSONL parsing: every bad-input case names file, line and field; skips are counted; fuzzed."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from grit_jax.data import records
from grit_jax.data.__main__ import main as data_main


def write(tmp_path, name, lines):
    path = tmp_path / name
    data = b"".join((x if isinstance(x, bytes) else (x + "\n").encode()) for x in lines)
    path.write_bytes(data)
    return str(path)


GOOD_EMB = json.dumps({"query": ["Find it", "q"], "pos": ["p"], "neg": ["n"]})
GOOD_GEN = json.dumps({"text": ["hi", "hello"]})

BAD = [
    ("malformed_json", "{not json", None, "malformed JSON"),
    ("wrong_type", "[1, 2]", None, "expected a JSON object, got list"),
    ("missing_field", json.dumps({"foo": 1}), None, "neither an embedding record"),
    ("missing_field", json.dumps({"query": "q"}), "pos", "missing"),
    ("empty_pos", json.dumps({"query": "q", "pos": []}), "pos", "empty list"),
    ("wrong_type", json.dumps({"query": 3, "pos": ["p"]}), "query", "expected a string or an"),
    ("wrong_type", json.dumps({"query": "q", "pos": "p"}), "pos", "expected a list, got str"),
    ("wrong_type", json.dumps({"query": "q", "pos": [["a", "b", "c"]]}), "pos[0]",
     "expected a string"),
    ("empty_field", json.dumps({"query": ["instr", "  "], "pos": ["p"]}), "query", "empty text"),
    ("empty_field", json.dumps({"query": "q", "pos": ["p"], "neg": [""]}), "neg[0]", "empty text"),
]
BAD_GEN = [
    ("empty_field", json.dumps({"text": ""}), "text", "empty text"),
    ("wrong_type", json.dumps({"text": 5}), "text", "expected a string or a non-empty list"),
    ("wrong_type", json.dumps({"text": ["only a user turn"]}), "turn 0",
     "must end with an assistant"),
    ("empty_field", json.dumps({"text": ["u", " "]}), "turn 1", "empty assistant turn"),
    ("wrong_type", json.dumps({"messages": [{"role": "system", "content": "x"}]}),
     "messages[0].role", "unsupported role"),
    ("empty_field", json.dumps({"messages": []}), "messages", "non-empty list"),
    ("wrong_type", json.dumps({"messages": [{"role": "user"}]}), "messages[0]", "expected"),
    ("wrong_type", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "turn 0",
     "expected a user turn"),
    ("wrong_type", json.dumps({"text": "t", "context": "doc"}), "context", "goes with messages"),
    ("wrong_type", json.dumps({"text": ["u", "a"], "context": "d"}), "context",
     "goes with messages"),
    ("wrong_type", json.dumps({"messages": [{"role": "user", "content": "u"},
                                            {"role": "assistant", "content": "a"}],
                               "context": 3}), "context", "non-empty string"),
    ("empty_field", json.dumps({"messages": [{"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}],
                                "context": " "}), "context", "non-empty string"),
]


@pytest.mark.parametrize("reason,line,field,problem", BAD + BAD_GEN)
def test_bad_record_error_names_file_line_field(tmp_path, reason, line, field, problem):
    good = GOOD_GEN if (reason, line, field, problem) in BAD_GEN else GOOD_EMB
    path = write(tmp_path, "d.jsonl", [good, "", line])
    with pytest.raises(records.RecordError) as e:
        records.read_records(path, records.SkipCounter())
    assert e.value.line == 3 and e.value.reason == reason
    assert str(e.value).startswith(f"{path}:3: " + (f"{field}: " if field else ""))
    assert problem in str(e.value)
    kind, recs = records.read_records(path, skips := records.SkipCounter(enabled=True))
    assert len(recs) == 1 and skips.counts == {reason: 1}


def test_non_utf8_mixed_kinds_and_empty_file(tmp_path):
    path = write(tmp_path, "a.jsonl", [GOOD_EMB, b'{"query": "caf\xe9", "pos": ["x"]}\n'])
    with pytest.raises(records.RecordError, match=r"a.jsonl:2: not valid UTF-8"):
        records.read_records(path, records.SkipCounter())
    path = write(tmp_path, "b.jsonl", [GOOD_EMB, GOOD_GEN])
    with pytest.raises(records.RecordError, match=r"b.jsonl:2: a generative record in a file of "
                                                  r"embedding records"):
        records.read_records(path, records.SkipCounter())
    path = write(tmp_path, "c.jsonl", [])
    with pytest.raises(records.RecordError, match=r"c.jsonl: no valid records"):
        records.read_records(path, records.SkipCounter())
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl files"):
        records.list_jsonl(str(tmp_path / "empty_dir"))


def test_normalised_forms():
    r = records.parse_embedding({"query": "q", "pos": ["p", ["i", "t"]]}, "f", 1)
    assert r == {"query": ["", "q"], "pos": [["", "p"], ["i", "t"]], "neg": []}
    g = records.parse_generative({"text": ["u", "a"]}, "f", 1)
    m = records.parse_generative({"messages": [{"role": "user", "content": "u"},
                                               {"role": "assistant", "content": "a"}]}, "f", 1)
    assert g == m == {"messages": [{"role": "user", "content": "u"},
                                   {"role": "assistant", "content": "a"}]}
    c = records.parse_generative(dict(m, context="a document"), "f", 1)
    assert c == dict(m, context="a document")


def build_main(argv):
    return data_main(["build", *argv])


def test_build_cli_stops_or_skips_with_counts(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write(src, "emb.jsonl", [GOOD_EMB, "{oops", json.dumps({"query": "q", "pos": []}), GOOD_EMB])
    write(src, "gen.jsonl", [GOOD_GEN])
    assert build_main(["--input", str(src), "--output", str(tmp_path / "out")]) == 2
    assert f"{src}/emb.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert build_main(["--input", str(src), "--output", str(tmp_path / "out"),
                       "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "emb: embedding, 2 examples" in out
    assert "skipped: 2 {'malformed_json': 1, 'empty_pos': 1}" in out
    from grit_jax.data.dataset import open_dataset

    meta = open_dataset(str(tmp_path / "out"))[1]
    assert meta["skipped"] == {"malformed_json": 1, "empty_pos": 1}
    assert build_main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 2
    assert "not a directory" in capsys.readouterr().err


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["query", "pos", "neg", "text", "messages", "role", "content", "x"]),
        children, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["query", "pos", "neg", "text", "messages", "x"]),
                           json_values, max_size=4))
def test_fuzz_parser_only_raises_record_errors(obj):
    kind = records.kind_of(obj)
    try:
        if kind == records.EMBEDDING:
            rec = records.parse_embedding(obj, "f.jsonl", 7)
            assert rec["pos"] and all(len(p) == 2 and p[1].strip() for p in rec["pos"])
        elif kind == records.GENERATIVE:
            rec = records.parse_generative(obj, "f.jsonl", 7)
            assert "text" in rec or rec["messages"][-1]["role"] == "assistant"
    except records.RecordError as e:
        assert str(e).startswith("f.jsonl:7: ")
