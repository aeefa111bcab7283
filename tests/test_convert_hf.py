"""Hugging Face import/export: logits parity with transformers both ways, CLI, shards, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from grit_jax import weights
from grit_jax.convert import hf
from grit_jax.convert.__main__ import main as convert_main
from grit_jax.model import forward, logits_fn
from tests import hf_models


def padded_batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (3, 11)).astype(np.int32)
    valid = np.ones((3, 11), bool)
    valid[1, 8:] = False
    valid[2, 3:] = False
    return ids, valid


def max_logit_diff(params, config, model, ids, valid):
    ours = np.asarray(logits_fn(params, config, forward(params, config, ids, valid).hidden))
    ref = hf_models.hf_logits(model, ids, valid)
    return float(np.abs((ours - ref)[valid]).max())


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {}),
    ("llama", {}),
    ("mistral", dict(sliding_window=4, tie_word_embeddings=True, rope_theta=1e6)),
    ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4, rope_parameters=None,
                   rope_theta=20000.0)),
])
def test_import_logits_match_transformers(tmp_path, family, overrides):
    model = hf_models.build(family, seed=7, **overrides)
    model.save_pretrained(str(tmp_path))
    params, config = hf.read_hf(str(tmp_path))
    assert config.family == family
    ids, valid = padded_batch(config.vocab_size)
    diff = max_logit_diff(params, config, model, ids, valid)
    print(f"import {family} {overrides}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_cli_roundtrip_export_loads_in_transformers(tmp_path, family, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_models.save_tiny(tmp_path / "hf", family, seed=3)
    assert convert_main(["hf-to-grit", "--hf", src, "--out", str(tmp_path / "grit")]) == 0
    assert os.path.exists(tmp_path / "grit" / "tokenizer.model")
    # Export with a tiny shard limit so the sharded index path is exercised.
    assert convert_main(["grit-to-hf", "--params", str(tmp_path / "grit"), "--out",
                         str(tmp_path / "back"), "--max-shard-gb", str(0.5 / 1024)]) == 0
    out = capsys.readouterr().out
    assert "peak RSS" in out
    assert os.path.exists(tmp_path / "back" / hf.SAFE_INDEX)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    params, config = weights.load(str(tmp_path / "grit"))
    ids, valid = padded_batch(config.vocab_size, seed=1)
    diff = max_logit_diff(params, config, reloaded.eval(), ids, valid)
    print(f"export {family}: max |logit diff| vs transformers-reloaded = {diff:.2e}")
    assert diff <= 1e-4
    # Weights survive the round trip bit for bit (float32 throughout).
    for (n1, p1), (n2, p2) in zip(sorted(original.state_dict().items()),
                                  sorted(reloaded.state_dict().items())):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    # The exported directory re-imports to the same params.
    params2, config2 = hf.read_hf(str(tmp_path / "back"))
    assert config2 == config


def test_export_bfloat16(tmp_path, mistral_dir):
    import torch
    from transformers import AutoModelForCausalLM

    hf.hf_to_grit(mistral_dir, str(tmp_path / "grit"))
    hf.grit_to_hf(str(tmp_path / "grit"), str(tmp_path / "bf16"), dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert model.dtype == torch.bfloat16
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"


def test_bf16_import(tmp_path, mistral_dir):
    params, config = hf.read_hf(mistral_dir, param_dtype="bfloat16")
    assert params["layers"]["attn"]["q"].dtype.name == "bfloat16"
    assert config.dtype == "bfloat16"


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file and the field or tensor; never a partial load.
# ------------------------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))
    return path


def test_unsupported_model_type(tmp_path, mistral_dir):
    d = _copy(mistral_dir, tmp_path / "m")
    path = _edit_config(d, model_type="gpt2")
    with pytest.raises(ValueError, match=f"{path}: model_type='gpt2' is not supported"):
        hf.read_hf(d)


def test_missing_config_field(tmp_path, mistral_dir):
    d = _copy(mistral_dir, tmp_path / "m")
    path = _edit_config(d, hidden_size=None)
    with pytest.raises(ValueError, match=rf"{path}: missing required field\(s\) \['hidden_size'\]"):
        hf.read_hf(d)


def _rewrite_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(d, hf.SAFE_SINGLE)
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_wrong_shape_names_file_and_tensor(tmp_path, mistral_dir):
    d = _copy(mistral_dir, tmp_path / "m")
    name = "model.layers.1.self_attn.k_proj.weight"

    def bad(t):
        t[name] = t[name][:-1]
        return t

    path = _rewrite_tensors(d, bad)
    with pytest.raises(ValueError, match=rf"{path}: tensor {name} has shape \(15, 48\), "
                                         r"expected \(16, 48\)"):
        hf.read_hf(d)


def test_missing_tensor(tmp_path, mistral_dir):
    d = _copy(mistral_dir, tmp_path / "m")
    name = "model.layers.2.mlp.up_proj.weight"
    _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing tensor.*{name}"):
        hf.read_hf(d)


def test_unexpected_tensor(tmp_path, mistral_dir):
    d = _copy(mistral_dir, tmp_path / "m")
    _rewrite_tensors(d, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias":
                                   np.zeros(48, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor.*q_proj.bias"):
        hf.read_hf(d)


def test_no_weights_and_cli_exit_code(tmp_path, mistral_dir, capsys):
    d = _copy(mistral_dir, tmp_path / "m")
    os.remove(os.path.join(d, hf.SAFE_SINGLE))
    assert convert_main(["hf-to-grit", "--hf", d, "--out", str(tmp_path / "o")]) == 2
    assert "neither model.safetensors nor model.safetensors.index.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_unreadable_tokenizer(tmp_path):
    from grit_jax.data.tokenizers import load_tokenizer

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=f"{bad}: not a readable SentencePiece model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(_empty(tmp_path)))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_params_checkpoint_mismatch(tmp_path, mistral_dir):
    hf.hf_to_grit(mistral_dir, str(tmp_path / "grit"))
    cfg = json.load(open(tmp_path / "grit" / "grit_config.json"))
    cfg["num_layers"] = 5
    json.dump(cfg, open(tmp_path / "grit" / "grit_config.json", "w"))
    with pytest.raises(ValueError, match="does not match the model"):
        weights.load(str(tmp_path / "grit"))


def test_config_reads_transformers_4_and_5_layouts():
    v4 = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    a, b = hf.config_from_hf(v4), hf.config_from_hf(v5)
    assert a == b and a.rope_scaling.factor == 8.0 and a.rope_theta == 500000.0
    assert hf.config_from_hf(hf.config_to_hf(a)) == a
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        hf.config_from_hf({**v5, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        hf.config_from_hf({**v5, "attention_bias": True})
