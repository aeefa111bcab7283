"""Every command line with bad input: one ``error:`` line naming the file, line, field or flag,
exit 2, no traceback, and earlier outputs left exactly as they were (grit_jax.cli, outputs)."""

import hashlib
import importlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grit_jax import cli
from grit_jax.generation import Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tree_digest(path) -> dict:
    """Every file under path -> sha1 of its bytes (what 'left intact' means)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def call(command: str, argv, capsys):
    """(exit code, stdout, stderr) of ``python -m command argv``, run in this process; command is
    a module, optionally followed by its subcommand ("grit_jax.data build")."""
    module, *subcommand = command.split()
    try:
        main = importlib.import_module(module + ".__main__").main
    except ModuleNotFoundError:
        main = importlib.import_module(module).main
    rc = main([*subcommand, *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# grit_jax.cli: what is a user error
# ----------------------------------------------------------------------------------------------
def test_own_checks_are_user_errors_library_failures_keep_their_traceback(capsys):
    def ours(argv):  # a check of grit_jax's own, raising ValueError
        Sampling(temperature=-1.0).check(vocab_size=10)

    def library(argv):
        np.reshape(np.zeros(3), (2, 2))  # numpy raises inside its own code: a bug of ours

    def missing(argv):  # grit_jax opening a path the user gave
        from grit_jax.data.records import iter_jsonl

        next(iter_jsonl("/no/such/file.jsonl"))

    def test_code(argv):  # not grit_jax's own code: treated as internal
        raise ValueError("raised outside grit_jax")

    assert cli.run(ours, []) == 2
    assert capsys.readouterr().err.startswith("error: temperature=-1.0 must be > 0")
    assert cli.run(missing, []) == 2
    assert capsys.readouterr().err == "error: /no/such/file.jsonl: no such file or directory\n"
    assert cli.run(test_code, []) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.run(library, []) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.run(ours, ["--debug"]) == 1  # --debug shows the traceback of a user error too
    assert "Traceback" in capsys.readouterr().err


def test_debug_environment_variable(capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.run(lambda argv: (_ for _ in ()).throw(cli.UserError("bad")), []) == 1
    assert "Traceback" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Fixtures: a small JSONL folder, a built dataset, a converted model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("jsonl")
    recs = [{"query": ["Find the passage", f"query number {i}"], "pos": [f"passage number {i}"],
             "neg": [f"unrelated text {i}"]} for i in range(8)]
    (src / "emb.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return src


@pytest.fixture(scope="module")
def params_dir(mistral_dir, tmp_path_factory):
    from grit_jax.convert.hf import hf_to_grit

    out = tmp_path_factory.mktemp("p") / "params"
    hf_to_grit(mistral_dir, str(out))
    return out


# ----------------------------------------------------------------------------------------------
# train (in-process: fails before compiling, so each case takes well under a second)
# ----------------------------------------------------------------------------------------------
def test_train_bad_input(tmp_path, capsys, jsonl_dir, data_dir):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    return undefined_name\n")
    (tmp_path / "preset.py").write_text(
        "def get_config(name):\n    raise ValueError(f'no {name}')\n")
    (tmp_path / "afile").write_text("x")
    w = ["--workdir", tmp_path / "w", "--compilation_cache=off"]
    cases = [
        ([], "--config is required"),
        (["--config", TINY], "--workdir is required"),
        (["--config", tmp_path / "missing.py", *w], "missing.py: no such file"),
        (["--config", tmp_path / "syntax.py", *w], "syntax.py:1:"),
        (["--config", tmp_path / "raises.py", *w], "raises.py:2: NameError"),
        (["--config", f"{tmp_path / 'preset.py'}:v9", *w], "preset.py:2: ValueError: no v9"),
        (["--config", TINY, *w, "--config.optim.lr=abc"], "--config.optim.lr=abc"),
        (["--config", TINY, *w, "--config.optim.lr=-5"], "optim.lr=-5"),
        (["--config", TINY, *w, "--config.optim.lr=nan"], "optim.lr=nan"),
        (["--config", TINY, *w, "--config.optim.warmup_ratio=1.5"], "optim.warmup_ratio=1.5"),
        (["--config", TINY, *w, "--config.optim.b2=1.0"], "optim.b2=1.0"),
        (["--config", TINY, *w, "--config.data.query_batch=0"], "data.query_batch=0"),
        (["--config", TINY, *w, "--config.total_steps=-1"], "total_steps=-1"),
        (["--config", TINY, *w, "--no_such_flag"], "no_such_flag"),
        (["--config", TINY, "--workdir", tmp_path / "afile"], "is a file, not a directory"),
        (["--config", TINY, *w], "data.data_dir is not set"),
        (["--config", TINY, *w, f"--config.data.data_dir={tmp_path / 'nodata'}"],
         "no grit_jax dataset here"),
        (["--config", TINY, *w, f"--config.data.data_dir={jsonl_dir}"], "no grit_jax dataset"),
        (["--config", TINY, *w, "--coordinator_address=localhost:1"], "--num_processes"),
        (["--config", TINY, *w, f"--config.data.data_dir={data_dir}",
          "--config.loss.gen_attention=context"], "has none (every pass would be causal)"),
    ]
    for argv, needle in cases:
        rc, _, err = call("grit_jax.train", argv, capsys)
        assert_user_error(rc, err, needle)
    assert not (tmp_path / "w").exists()  # nothing was written by any of them
    # No data, or none there: refused before the workdir (or its compilation cache) is made.
    nodata = f"--config.data.data_dir={tmp_path / 'nodata'}"
    for extra, needle in (([], "data.data_dir is not set"), ([nodata], "no grit_jax dataset")):
        rc, _, err = call("grit_jax.train",
                          ["--config", TINY, "--workdir", tmp_path / "w2", *extra], capsys)
        assert_user_error(rc, err, needle)
        assert not (tmp_path / "w2").exists()


# ----------------------------------------------------------------------------------------------
# grit_jax.data build and demo.wikipedia
# ----------------------------------------------------------------------------------------------
def test_build_bad_input_and_earlier_output_intact(tmp_path, capsys, jsonl_dir):
    out = tmp_path / "data"
    rc, stdout, err = call("grit_jax.data build", ["--input", jsonl_dir, "--output", out], capsys)
    assert rc == 0, err
    assert f"-> {out} (give this folder to training" in stdout
    before = tree_digest(out)
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"query": "q", "pos": ["p"], "pos": ["other"]}\n')
    arr = tmp_path / "arr"
    arr.mkdir()
    (arr / "a.jsonl").write_text('[\n  {"text": "hello"}\n]\n')
    cases = [
        (["--input", tmp_path / "nope", "--output", tmp_path / "o"], "nope: not a directory"),
        (["--input", tmp_path / "afile", "--output", tmp_path / "o"], "afile: not a directory"),
        (["--input", tmp_path, "--output", tmp_path / "o"], "no *.jsonl files"),
        (["--input", jsonl_dir, "--output", out], "already holds"),  # the earlier build
        (["--input", jsonl_dir, "--output", tmp_path / "afile"], "is a file"),
        (["--input", jsonl_dir, "--output", tmp_path / "o", "--max-query-length", "0"],
         "--max-query-length 0"),
        (["--input", bad, "--output", tmp_path / "o"], "a.jsonl:1: pos: given twice"),
        (["--input", arr, "--output", tmp_path / "o"], "a.jsonl:1: malformed JSON"),
        (["--input", jsonl_dir, "--output", tmp_path / "o", "--tokenizer", tmp_path / "nope"],
         "nope"),
    ]
    for argv, needle in cases:
        rc, _, err = call("grit_jax.data build", argv, capsys)
        assert_user_error(rc, err, needle)
        if "a.jsonl:1: malformed" in needle:
            assert "one JSON object per line" in err
    assert tree_digest(out) == before
    assert not (tmp_path / "o").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial." in p]  # no staging left behind
    # --overwrite replaces the whole dataset (a file of the old one does not survive).
    (out / "stale.txt").write_text("old")
    rc, _, err = call("grit_jax.data build", ["--input", jsonl_dir, "--output", out,
                                              "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "stale.txt").exists()
    mode = os.stat(next(out.rglob("dataset_info.json"))).st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_build_counts_truncation_and_accepts_a_bom(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    long = " ".join(["word"] * 200)
    recs = [{"query": long, "pos": ["short"]}, {"query": "q", "pos": [long, long]}]
    (src / "e.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode())
    rc, out, err = call("grit_jax.data build", ["--input", src, "--output", tmp_path / "d",
                                                "--max-query-length", "16",
                                                "--max-passage-length", "32"], capsys)
    assert rc == 0, err
    assert "truncated at max length: 2 passages, 1 query" in out
    from grit_jax.data.dataset import dataset_path, open_dataset

    assert open_dataset(str(tmp_path / "d"))[1]["datasets"]["e"]["truncated"] == {
        "query": 1, "passage": 2}
    # The folder TFDS itself names (…/grit_jsonl/1.0.0) is accepted as data_dir too.
    versioned = dataset_path(str(tmp_path / "d"))
    assert dataset_path(versioned) == versioned
    assert dataset_path(os.path.dirname(versioned)) == versioned


def test_missing_negatives_message_gives_a_way_out(tmp_path, jsonl_dir):
    from grit_jax.data.dataset import build
    from grit_jax.data.pipeline import GritBatches, PipelineConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "e.jsonl").write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    build(str(src), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="group_size=1"):
        GritBatches(PipelineConfig(str(tmp_path / "d"), query_batch=1, generative_batch=1,
                                   group_size=2, mode="embedding"))


def test_wiki_demo_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    rc, _, err = call("demo.wikipedia", ["--out", tmp_path / "d"], capsys)
    assert_user_error(rc, err, "already holds 1 entry (mine.txt)", "--overwrite")
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"
    rc, _, err = call("demo.wikipedia", ["--out", tmp_path / "e",
                                                  "--max-passage-length", "-3"], capsys)
    assert_user_error(rc, err, "--max-passage-length -3")


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------
def test_convert_bad_input_and_exports_never_mix(tmp_path, capsys, mistral_dir, params_dir):
    cut = tmp_path / "cut"
    shutil.copytree(mistral_dir, cut)
    st = cut / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (tmp_path / "afile").write_text("x")
    hf = tmp_path / "hf"
    rc, _, err = call("grit_jax.convert", ["grit-to-hf", "--params", params_dir, "--out", hf],
                      capsys)
    assert rc == 0, err
    assert os.stat(hf / "model.safetensors").st_mode & 0o777 == 0o666 & ~_umask()
    before = tree_digest(hf)
    cases = [
        (["hf-to-grit", "--hf", tmp_path / "nope", "--out", tmp_path / "o"], "nope"),
        (["hf-to-grit", "--hf", cut, "--out", tmp_path / "o"],
         f"{st}: not a readable safetensors file"),
        (["hf-to-grit", "--hf", mistral_dir, "--out", params_dir], "already holds"),
        (["hf-to-grit", "--hf", mistral_dir, "--out", tmp_path / "afile"], "is a file"),
        (["grit-to-hf", "--params", params_dir, "--out", hf], "already holds"),
        (["grit-to-hf", "--params", tmp_path / "nope", "--out", tmp_path / "o"], "nope"),
        (["grit-to-hf", "--params", params_dir, "--out", tmp_path / "o", "--step", "3"],
         "--step 3"),
        (["grit-to-hf", "--params", params_dir, "--out", tmp_path / "o", "--max-shard-gb", "0"],
         "--max-shard-gb 0"),
        (["grit-to-hf", "--params", params_dir, "--out", tmp_path / "o", "--tokenizer",
          tmp_path / "nope"], "nope"),
        (["gguf-to-grit", "--gguf", tmp_path / "afile", "--out", tmp_path / "o"], "afile"),
    ]
    for argv, needle in cases:
        rc, _, err = call("grit_jax.convert", argv, capsys)
        assert_user_error(rc, err, needle)
    assert tree_digest(hf) == before
    assert not (tmp_path / "o").exists()
    # --overwrite replaces every file: a sharded export over a single-file one leaves no stale
    # model.safetensors beside the new shards and index.
    (hf / "notes.txt").write_text("stale")
    rc, _, err = call("grit_jax.convert", ["grit-to-hf", "--params", params_dir, "--out", hf,
                                           "--overwrite", "--max-shard-gb", "0.0001"], capsys)
    assert rc == 0, err
    names = sorted(os.listdir(hf))
    assert "model.safetensors" not in names and "notes.txt" not in names
    assert "model.safetensors.index.json" in names
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf))  # the replaced export loads whole


# ----------------------------------------------------------------------------------------------
# rag, evaluate, aot, launch
# ----------------------------------------------------------------------------------------------
def test_rag_evaluate_aot_launch_bad_input(tmp_path, capsys, params_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "A document."}) + "\n")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "x").write_text("x")
    (tmp_path / "res.json").write_text("{}")
    ask = ["ask", "--model", params_dir, "--index", tmp_path / "existing", "--query", "q"]
    rag_cases = [
        (ask + ["--max-new-tokens", "0"], "--max-new-tokens 0"),
        (ask + ["--top-k", "0"], "--top-k 0"),
        (["ask", "--model", params_dir, "--index", tmp_path / "nope", "--query", "q"],
         "--index"),
        (["index", "--model", params_dir, "--corpus", corpus, "--out", tmp_path / "existing"],
         "already holds"),
        (["index", "--model", params_dir, "--corpus", tmp_path / "nope.jsonl", "--out",
          tmp_path / "i"], "nope.jsonl"),
        (["index", "--model", params_dir, "--corpus", corpus, "--out", tmp_path / "i",
          "--max-length", "100000"], "max_length=100000"),
        (["index", "--model", tmp_path / "nope", "--corpus", corpus, "--out", tmp_path / "i"],
         "nope"),
    ]
    for argv, needle in rag_cases:
        rc, _, err = call("grit_jax.rag", argv, capsys)
        assert_user_error(rc, err, needle)
    assert not (tmp_path / "i").exists()
    ev_cases = [
        (["--model", params_dir, "--task", "nosuchkind:x"], "nosuchkind"),
        (["--model", params_dir, "--task", f"retrieval:{tmp_path / 'nope'}"], "nope"),
        (["--model", params_dir, "--task", f"retrieval:{corpus}", "--out", tmp_path / "res.json"],
         "res.json: already exists"),
        (["--model", params_dir, "--task", f"retrieval:{corpus}", "--batch-size", "0"],
         "--batch-size 0"),
    ]
    for argv, needle in ev_cases:
        rc, _, err = call("grit_jax.evaluation", argv, capsys)
        assert_user_error(rc, err, needle)
    assert (tmp_path / "res.json").read_text() == "{}"
    aot_cases = [
        (["--config", tmp_path / "nope.py", "--topology", "v5p:2x2x1"], "nope.py: no such file"),
        (["--config", TINY], "--topology are required"),
        (["--config", TINY, "--topology", "v5p:2x2x1", "--lengths", "1,2"], "--lengths"),
        (["--config", TINY, "--topology", "v5p:2x2x1", "--slices", "0"], "--slices=0"),
    ]
    for argv, needle in aot_cases:
        rc, _, err = call("grit_jax.aot", argv, capsys)
        assert_user_error(rc, err, needle)
    env = dict(os.environ, PATH="/nonexistent")
    p = subprocess.run([sys.executable, "launch/tpu.py", "create", "--name", "grit", "--zone",
                        "us-east5-a", "--accelerator", "v5p-8"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert_user_error(p.returncode, p.stderr, "gcloud is not on PATH")


# ----------------------------------------------------------------------------------------------
# Python API values that cannot be right
# ----------------------------------------------------------------------------------------------
def test_api_refuses_impossible_values(params_dir):
    from grit_jax.inference import GritLM

    m = GritLM.from_pretrained(str(params_dir))
    limit = m.config.max_position_embeddings
    for kw, needle in [({"max_new_tokens": 0}, "max_new_tokens=0"),
                       ({"max_new_tokens": -3}, "max_new_tokens=-3"),
                       ({"max_new_tokens": limit + 1}, f"max_new_tokens={limit + 1}"),
                       ({"sampling": Sampling(greedy=False, temperature=-1.0)}, "temperature=-1.0"),
                       ({"sampling": Sampling(greedy=False, top_p=1.5)}, "top_p=1.5"),
                       ({"sampling": Sampling(greedy=False, top_k=-1)}, "top_k=-1"),
                       ({"batch_size": 0}, "batch_size=0")]:
        with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
            m.generate("hello", **kw)
    for kw, needle in [({"max_length": 0}, "max_length=0: must be an integer in"),
                       ({"max_length": 100000}, f"max_length=100000: must be an integer in \\[1, "
                                                f"{limit}\\]"),
                       ({"batch_size": 0}, "batch_size=0")]:
        with pytest.raises(ValueError, match=needle):
            m.encode(["a text"], **kw)


def test_encode_counts_what_it_truncates(params_dir, caplog):
    from grit_jax.inference import GritLM

    m = GritLM.from_pretrained(str(params_dir))
    with caplog.at_level("WARNING"):
        m.encode(["word " * 300, "short"], max_length=32)
    assert "1 of 2 inputs were longer than max_length=32" in caplog.text


# ----------------------------------------------------------------------------------------------
# Property: random bad flags never end in a traceback, for any command
# ----------------------------------------------------------------------------------------------
BAD_VALUES = ["", "-1", "0", "nan", "1e309", "abc", "missing/x", "ü", "--", "1,2,3,4"]
COMMANDS = {
    "grit_jax.data build": (["--input", "{jsonl}", "--output", "{new}"],
                            ["--max-query-length", "--max-passage-length", "--tokenizer",
                             "--max-generative-length", "--input", "--output"]),
    "demo.wikipedia": (["--out", "{new}", "--max-query-length", "0"],
                                ["--max-query-length", "--max-passage-length", "--out"]),
    "grit_jax.convert": (["grit-to-hf", "--params", "{params}", "--out", "{new}", "--step", "1"],
                         ["--step", "--max-shard-gb", "--dtype", "--tokenizer", "--params"]),
    "grit_jax.rag": (["ask", "--model", "{params}", "--index", "{new}", "--query", "q"],
                     ["--top-k", "--max-new-tokens", "--cache", "--attn", "--pooling-method",
                      "--model"]),
    "grit_jax.evaluation": (["--model", "{params}", "--task", "retrieval:missing/t.jsonl"],
                          ["--batch-size", "--max-length", "--attn", "--pooling", "--task"]),
    "grit_jax.train": (["--config", TINY, "--workdir", "{new}", "--compilation_cache=off",
                        "--config.data.data_dir=missing/d"],
                       ["--config.optim.lr", "--config.data.query_batch", "--config.total_steps",
                        "--config.optim.b1", "--config.mesh.data", "--workdir", "--config",
                        "--config.model.attention_impl", "--num_processes"]),
    "grit_jax.data adapt": (["--input", "{jsonl}", "--output", "{new}", "--eval-fraction", "1.5"],
                            ["--eval-fraction", "--passage-words", "--min-words", "--negatives",
                             "--input", "--output"]),
    "demo": (["--out", "{new}", "--steps", "0"], ["--steps", "--config", "--model",
                                                           "--out"]),
    "grit_jax.aot": (["--config", TINY, "--topology", "v5p:2x2x1", "--lengths", "0,0,0"],
                     ["--topology", "--lengths", "--slices", "--config"]),
}


def test_random_bad_flags_never_print_a_traceback(tmp_path, capsys, jsonl_dir, params_dir,
                                                  monkeypatch):
    """Each base command line is invalid; two random flags get random bad values on top. Where
    a random value happens to repair it, the command may succeed: it must still not crash."""
    monkeypatch.chdir(tmp_path)  # relative paths among the values land here
    rng = random.Random(0)
    for module, (base, flags_) in COMMANDS.items():
        for trial in range(6):
            argv = [a.format(jsonl=jsonl_dir, params=params_dir, new=tmp_path / f"n{trial}")
                    for a in base]
            for flag in rng.sample(flags_, k=min(2, len(flags_))):
                value = rng.choice(BAD_VALUES)
                argv += [f"{flag}={value}"] if module in ("grit_jax.train", "grit_jax.aot") or \
                    value.startswith("-") else [flag, value]
            rc, _, err = call(module, argv, capsys)
            assert "Traceback" not in err, (module, argv, err[-3000:])
            assert rc in (0, 2), (module, argv, rc, err)
