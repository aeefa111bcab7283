"""GGUF (llama.cpp) -> grit_jax for ``general.architecture == "llama"`` files, tensor by tensor.

The file is memory-mapped by ``gguf.GGUFReader``; each tensor is dequantized to float32 with
``gguf.quants.dequantize`` (any quantization the ``gguf`` package implements), renamed to its
Hugging Face name, and placed with the HF layouts of :mod:`grit_jax.convert.hf` into preallocated
stacked arrays (one float copy of the model in memory). llama.cpp stores the q/k projection rows
interleaved for its RoPE kernel; that permutation is undone here, so the weights equal what
``convert_hf_to_gguf.py`` was given.

The tokenizer comes from the file's metadata: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE)
becomes a Hugging Face ``tokenizer.json`` plus ``tokenizer_config.json`` (special tokens, the
file's chat template) beside the params. Other tokenizer kinds convert the weights only, with a
warning (inference then needs ``--tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
from tokenizers import pre_tokenizers as pt

from grit_jax import checkpoint, outputs
from grit_jax.config import ModelConfig
from grit_jax.convert import hf
from grit_jax.data.tokenizers import HF_CONFIG_FILE, HF_FILE

ARCH = "llama"

# Tensors every layer / the model has, GGUF name -> HF name ({i}: layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor, or None if it is not a Llama weight."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head: pairs interleaved) -> Hugging Face's (halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------
def _import_gguf():
    try:
        import gguf  # noqa: F401
        import gguf.quants  # noqa: F401
    except ImportError as e:
        raise ValueError(f"reading GGUF files needs the 'gguf' package (pip install gguf): {e}") \
            from None
    return gguf


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` for path; unreadable or truncated files are a ValueError naming it."""
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file does not exist")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct/index errors... on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None


def read_metadata(reader) -> dict:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field the reader cannot decode is left out
            continue
    return out


def _clean_float(x) -> float:
    """The shortest decimal that round-trips the float32 metadata value (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _get(meta: dict, key: str, path: str, cast=int, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{path}: missing GGUF metadata field {key!r}")
    try:
        return cast(meta[key])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: GGUF metadata field {key!r} = {meta[key]!r} is not "
                         f"a {cast.__name__}") from None


def config_from_gguf(meta: dict, tensor_names, path: str = "<gguf>", **overrides) -> ModelConfig:
    """ModelConfig from llama GGUF metadata, through ``hf.config_from_hf`` (same checks)."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported "
                         f"(only {ARCH!r} GGUF files convert)")
    a = ARCH
    experts = _get(meta, f"{a}.expert_count", path, default=0)
    if experts:
        raise ValueError(f"{path}: {a}.expert_count={experts}: mixture-of-experts models are "
                         f"not supported")
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: {a}.rope.scaling.type={scaling!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE factors, e.g. "
                         f"Llama-3.1 scaling) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else _get(meta, f"{a}.vocab_size", path)
    if f"{a}.vocab_size" in meta and int(meta[f"{a}.vocab_size"]) != vocab:
        raise ValueError(f"{path}: {a}.vocab_size={meta[f'{a}.vocab_size']} disagrees with the "
                         f"{vocab} entries of tokenizer.ggml.tokens")
    heads = _get(meta, f"{a}.attention.head_count", path)
    hidden = _get(meta, f"{a}.embedding_length", path)
    head_dim = _get(meta, f"{a}.attention.key_length", path, default=hidden // max(heads, 1))
    v_dim = _get(meta, f"{a}.attention.value_length", path, default=head_dim)
    rope_dim = _get(meta, f"{a}.rope.dimension_count", path, default=head_dim)
    if v_dim != head_dim:
        raise ValueError(f"{path}: {a}.attention.value_length={v_dim} != key_length={head_dim} "
                         f"is not supported")
    if rope_dim != head_dim:
        raise ValueError(f"{path}: {a}.rope.dimension_count={rope_dim} (partial RoPE) is not "
                         f"supported; head_dim is {head_dim}")
    hf_cfg = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _get(meta, f"{a}.feed_forward_length", path),
        "num_hidden_layers": _get(meta, f"{a}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(meta, f"{a}.attention.head_count_kv", path, default=heads),
        "head_dim": head_dim,
        "rope_theta": _clean_float(_get(meta, f"{a}.rope.freq_base", path, float, 10000.0)),
        "rms_norm_eps": _clean_float(_get(meta, f"{a}.attention.layer_norm_rms_epsilon", path,
                                          float)),
        "max_position_embeddings": _get(meta, f"{a}.context_length", path, default=4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for field, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                       ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if key in meta:
            hf_cfg[field] = int(meta[key])
    return hf.config_from_hf(hf_cfg, source=path, **overrides)


def read_gguf_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor names (no tensor is read)."""
    reader = open_gguf(path)
    return config_from_gguf(read_metadata(reader), {t.name: t for t in reader.tensors}, path,
                            **overrides)


def read_gguf(path: str, *, param_dtype: str = "float32", **config_overrides):
    """(params as a nested dict of jax arrays, ModelConfig, metadata dict) from a llama GGUF."""
    reader = open_gguf(path)  # checks that the gguf package is installed
    import gguf.quants

    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, tensors, path, param_dtype=param_dtype, dtype=param_dtype,
                              **config_overrides)
    stacked = hf.StackedParams(config)
    by_hf = {}
    unexpected = []
    for name in tensors:
        h = hf_name(name)
        if h is None or h not in stacked.expected:
            unexpected.append(name)
        else:
            by_hf[h] = name
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) for a {config.num_layers}-layer llama "
                         f"model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(n for n in stacked.expected if n not in by_hf)
    if missing:
        raise ValueError(f"{path}: missing tensor(s) (HF names) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (file incomplete?)")
    for h in stacked.expected:
        name = by_hf[h]
        t = tensors[name]
        want = stacked.hf_shape(h)
        # ggml lists dimensions fastest-first: reversed, they are the numpy (= HF) shape.
        ggml_shape = tuple(int(x) for x in reversed(list(t.shape)))
        if ggml_shape != want:
            raise ValueError(f"{path}: tensor {name} ({h}) has shape {ggml_shape}, expected "
                             f"{want} from the metadata")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name}: {e}") from None
        except Exception as e:  # truncated data, bad block sizes
            raise ValueError(f"{path}: tensor {name} ({t.tensor_type.name}) cannot be "
                             f"dequantized ({type(e).__name__}: {e})") from None
        w = np.asarray(w, np.float32).reshape(want)
        if h.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config.num_heads)
        elif h.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        stacked.put(h, w, f"{path}: {name}")
    del reader, tensors
    return stacked.params(), config, meta


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE pre-tokenizers, by ``tokenizer.ggml.pre`` (llama.cpp's names). Unknown
# names are an error: a wrong split gives silently different token ids.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None, path: str):
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: every digit alone, then the GPT-2 split
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama3", "llama-v3", "llama-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported "
                     f"(default, gpt2, smollm, llama-bpe)")


def build_tokenizer(meta: dict, path: str = "<gguf>"):
    """(tokenizers.Tokenizer, tokenizer_config dict) for a ``gpt2`` (byte-level BPE) GGUF."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported "
                         f"(only 'gpt2' byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens:
        raise ValueError(f"{path}: missing GGUF metadata field 'tokenizer.ggml.tokens'")
    if not merges:
        raise ValueError(f"{path}: missing GGUF metadata field 'tokenizer.ggml.merges'")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{path}: tokenizer.ggml.merges entry {m!r} is not 'a b'")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos_token_id"), token("eos_token_id")
    # Only transformers reads the post-processor (grit_jax adds BOS itself when add_bos_token).
    wrap = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
    if wrap:
        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + (
            [f"{eos}:0"] if add_eos and eos else [])
        pair = single + [s.replace(":0", ":1").replace("$A", "$B") for s in single]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair),
            special_tokens=[(t, vocab[t]) for t in sorted(set(wrap))])
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok, cfg


def tokenizer_dir(path: str) -> str:
    """A folder holding the GGUF file's tokenizer as tokenizer.json (what ``load_tokenizer``
    reads), built once per file (keyed by its path, size and modification time) under
    ``~/.cache/grit_jax/gguf_tokenizers``."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = os.path.join(os.path.expanduser("~"), ".cache", "grit_jax", "gguf_tokenizers")
    out = os.path.join(root, key.hexdigest()[:16])
    if not os.path.exists(os.path.join(out, HF_FILE)):
        tok, cfg = build_tokenizer(read_metadata(open_gguf(path)), path)
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging.", dir=root)
        save_tokenizer(tok, cfg, staging)
        try:
            os.rename(staging, out)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return out


def save_tokenizer(tok, cfg: dict, out_dir: str) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json (what ``load_tokenizer`` reads)."""
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, HF_FILE), os.path.join(out_dir, HF_CONFIG_FILE)]
    tok.save(files[0])
    with open(files[1], "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return files


def gguf_to_grit(gguf_path: str, out_dir: str, *, param_dtype: str = "float32",
                 overwrite: bool = False) -> ModelConfig:
    """Convert a llama-architecture GGUF file into a grit_jax params directory (+ tokenizer),
    written whole or not at all."""
    outputs.check_target(out_dir, overwrite=overwrite)
    params, config, meta = read_gguf(gguf_path, param_dtype=param_dtype)
    try:  # check the tokenizer before writing anything
        tokenizer = build_tokenizer(meta, gguf_path)
    except ValueError as e:
        tokenizer = None
        warnings.warn(f"{e}; weights converted without a tokenizer (pass --tokenizer at "
                      f"inference)", stacklevel=2)
    with outputs.staged_dir(out_dir, overwrite=overwrite) as staging:
        checkpoint.save_params(params, config, staging)
        if tokenizer is not None:
            save_tokenizer(*tokenizer, staging)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "do_sample": False}
        with open(os.path.join(staging, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
    return config
