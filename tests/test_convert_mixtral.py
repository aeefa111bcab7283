"""Mixtral (MixtralForCausalLM): logits, round trip, embeddings and generation against
transformers and gritlm on tiny random models; fused, incomplete and unsupported checkpoints."""

import json
import os

import numpy as np
import pytest

from grit_jax import weights
from grit_jax.convert import hf
from grit_jax.convert.__main__ import main as convert_main
from grit_jax.inference import GritLM
from grit_jax.model import forward, logits_fn
from tests import hf_models
from tests.test_convert_hf import _copy, _edit_config, _rewrite_tensors, padded_batch
from tests.test_embedding import DOCS, INSTRUCTION, QUERIES, gritlm_instruction

SMALL = dict(vocab_size=512)  # where the real tokenizer is not needed


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A tiny Mixtral with a 512-token vocabulary, saved by transformers (no tokenizer)."""
    d = tmp_path_factory.mktemp("mixtral_small")
    hf_models.build("mixtral", seed=5, **SMALL).save_pretrained(str(d))
    return str(d)


def our_logits(params, config, ids, valid):
    return np.asarray(logits_fn(params, config, forward(params, config, ids, valid).hidden))


def max_diff(a, b, valid):
    return float(np.abs((a - b)[valid]).max())


def swap_experts(params, layer, a, b):
    """params with experts a and b of one layer exchanged (router left alone)."""
    moe = {k: np.array(v) for k, v in params["layers"]["moe"].items()}
    for k in ("gate", "up", "down"):
        moe[k][layer, [a, b]] = moe[k][layer, [b, a]]
    return {**params, "layers": {**params["layers"], "moe": moe}}


# ------------------------------------------------------------------------------------------------
# Import: logits equal transformers'
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,impls", [
    ({}, ("tiled",)),  # 3 experts, top-2, untied
    (dict(num_local_experts=5, num_experts_per_tok=1, tie_word_embeddings=True), ("tiled",)),
    (dict(num_local_experts=5, num_experts_per_tok=2, sliding_window=4, head_dim=12),
     ("tiled", "dense", "ragged")),
])
def test_import_logits_match_transformers(tmp_path, overrides, impls):
    model = hf_models.build("mixtral", seed=7, **SMALL, **overrides)
    model.save_pretrained(str(tmp_path))
    params, config = hf.read_hf(str(tmp_path))
    assert config.family == "mixtral" and config.num_experts == model.config.num_local_experts
    assert config.num_experts_per_tok == model.config.num_experts_per_tok
    assert config.sliding_window == model.config.sliding_window
    assert params["layers"]["moe"]["gate"].shape == (2, config.num_experts, 32, 40)
    assert "mlp" not in params["layers"]
    ids, valid = padded_batch(config.vocab_size)
    ref = hf_models.hf_logits(model, ids, valid)
    for impl in impls:
        diff = max_diff(our_logits(params, config.replace(moe_impl=impl), ids, valid), ref, valid)
        print(f"import mixtral {overrides} moe_impl={impl}: max |logit diff| = {diff:.2e}")
        assert diff <= 1e-4, impl
    # The experts matter: exchanging two of them moves the logits far beyond the tolerance.
    swapped = our_logits(swap_experts(params, 1, 0, 1), config, ids, valid)
    assert max_diff(swapped, ref, valid) > 1e-2


def test_config_round_trip_and_transformers_reads_it(tmp_path):
    from transformers import AutoConfig

    src = {"model_type": "mixtral", **hf_models.CONFIGS["mixtral"], "sliding_window": 8}
    c = hf.config_from_hf(src)
    assert (c.num_experts, c.num_experts_per_tok, c.router_aux_loss_coef, c.sliding_window) == (
        3, 2, 0.001, 8)
    written = hf.config_to_hf(c)
    assert hf.config_from_hf(written) == c
    (tmp_path / "config.json").write_text(json.dumps(written))
    rc = AutoConfig.from_pretrained(str(tmp_path))
    assert type(rc).__name__ == "MixtralConfig"
    assert (rc.num_local_experts, rc.num_experts_per_tok, rc.router_jitter_noise,
            rc.output_router_logits, rc.sliding_window) == (3, 2, 0.0, False, 8)
    # Fields left out take transformers' MixtralConfig defaults.
    bare = {k: v for k, v in written.items()
            if k not in ("rope_theta", "rope_parameters", "rms_norm_eps", "router_aux_loss_coef",
                         "num_experts_per_tok")}
    d = hf.config_from_hf(bare)
    assert (d.rope_theta, d.rms_norm_eps, d.router_aux_loss_coef, d.num_experts_per_tok) == (
        1e6, 1e-5, 0.001, 2)


# ------------------------------------------------------------------------------------------------
# Round trip through the CLI, sharded, loaded back by transformers
# ------------------------------------------------------------------------------------------------
def test_cli_roundtrip_export_loads_in_transformers(tmp_path, small_dir, capsys):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert convert_main(["hf-to-grit", "--hf", small_dir, "--out", str(tmp_path / "grit")]) == 0
    assert convert_main(["grit-to-hf", "--params", str(tmp_path / "grit"), "--out",
                         str(tmp_path / "back"), "--max-shard-gb", str(0.05 / 1024)]) == 0
    assert "mixtral" in capsys.readouterr().out
    index = json.load(open(tmp_path / "back" / hf.SAFE_INDEX))
    assert len(set(index["weight_map"].values())) > 2
    with safe_open(os.path.join(small_dir, hf.SAFE_SINGLE), framework="numpy") as f:
        original_names = set(f.keys())
    assert set(index["weight_map"]) == original_names
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in original_names
    assert not any("gate_up_proj" in n or "mlp." in n for n in index["weight_map"])
    cfg = json.load(open(tmp_path / "back" / "config.json"))
    assert (cfg["architectures"], cfg["model_type"], cfg["num_local_experts"]) == (
        ["MixtralForCausalLM"], "mixtral", 3)
    original = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"),
                                                    dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    for (n1, p1), (n2, p2) in zip(sorted(original.state_dict().items()),
                                  sorted(reloaded.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1
    params, config = weights.load(str(tmp_path / "grit"))
    ids, valid = padded_batch(config.vocab_size, seed=1)
    ours = our_logits(params, config, ids, valid)
    diff = max_diff(ours, hf_models.hf_logits(reloaded, ids, valid), valid)
    print(f"export mixtral: max |logit diff| vs transformers-reloaded = {diff:.2e}")
    assert diff <= 1e-4
    assert max_diff(hf_models.hf_logits(original, ids, valid),
                    hf_models.hf_logits(reloaded, ids, valid), valid) == 0.0
    _, config2 = hf.read_hf(str(tmp_path / "back"))
    assert config2 == config


# ------------------------------------------------------------------------------------------------
# Embeddings vs gritlm and greedy generation vs transformers (real tokenizer)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn,pooling", [("bbcc", "mean"), ("cccc", "weightedmean")])
def test_embeddings_match_gritlm(mixtral_dir, attn, pooling):
    import torch
    from gritlm import GritLM as RefGritLM

    ref = RefGritLM(mixtral_dir, mode="embedding", pooling_method=pooling, attn=attn,
                    device="cpu", dtype=torch.float32)
    assert type(ref.model).__name__ == "MixtralModel"
    ours = GritLM.from_pretrained(mixtral_dir, attn=attn, pooling_method=pooling)
    texts = QUERIES + DOCS
    want = ref.encode(texts, instruction=gritlm_instruction(INSTRUCTION), batch_size=6,
                      max_length=128)
    got = ours.encode(texts, instruction=INSTRUCTION, batch_size=6, max_length=128)
    diff = float(np.abs(got - want).max())
    print(f"mixtral {attn} {pooling}: max |embedding diff| vs gritlm = {diff:.2e}")
    assert got.shape == want.shape and diff <= 1e-4


# ------------------------------------------------------------------------------------------------
# Bad input: errors naming the file and the tensor or field
# ------------------------------------------------------------------------------------------------
def test_fused_expert_layout_refused(tmp_path, small_dir):
    d = _copy(small_dir, tmp_path / "m")

    def fuse(t):
        t = {k: v for k, v in t.items() if "layers.0.block_sparse_moe.experts" not in k}
        t["model.layers.0.mlp.experts.gate_up_proj"] = np.zeros((3, 80, 32), np.float32)
        t["model.layers.0.mlp.experts.down_proj"] = np.zeros((3, 32, 40), np.float32)
        return t

    path = _rewrite_tensors(d, fuse)
    with pytest.raises(ValueError, match=rf"{path}: tensor model\.layers\.0\.mlp\.experts\."
                                         r"down_proj holds fused experts.*per-expert layout "
                                         r"model\.layers\.N\.block_sparse_moe\.experts\.M\."
                                         r"w1/w2/w3\.weight"):
        hf.read_hf(d)


def test_missing_expert_tensor(tmp_path, small_dir):
    d = _copy(small_dir, tmp_path / "m")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=rf"{d}: missing tensor\(s\) \['{name}'\]"):
        hf.read_hf(d)


def test_misshapen_expert_tensor(tmp_path, small_dir):
    d = _copy(small_dir, tmp_path / "m")
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"

    def bad(t):
        t[name] = t[name][:, :-1]
        return t

    path = _rewrite_tensors(d, bad)
    with pytest.raises(ValueError, match=rf"{path}: tensor {name} has shape \(32, 39\), "
                                         r"expected \(32, 40\)"):
        hf.read_hf(d)


def test_unexpected_expert_tensor(tmp_path, small_dir):
    d = _copy(small_dir, tmp_path / "m")
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    _rewrite_tensors(d, lambda t: {**t, name: np.zeros((40, 32), np.float32)})
    with pytest.raises(ValueError, match=rf"unexpected tensor\(s\) for MixtralForCausalLM: "
                                         rf"\['{name}'\]"):
        hf.read_hf(d)


@pytest.mark.parametrize("changes,message", [
    (dict(router_jitter_noise=0.1), r"router_jitter_noise=0\.1 is not supported"),
    (dict(num_local_experts=None), r"missing required field 'num_local_experts'"),
    (dict(num_local_experts=0), r"num_local_experts=0 \(must be >= 1\)"),
])
def test_unsupported_config(tmp_path, small_dir, changes, message):
    d = _copy(small_dir, tmp_path / "m")
    path = _edit_config(d, **changes)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        hf.read_hf(d)


def test_too_many_experts_per_token_cli_exit_code(tmp_path, small_dir, capsys):
    d = _copy(small_dir, tmp_path / "m")
    path = _edit_config(d, num_experts_per_tok=4)
    assert convert_main(["hf-to-grit", "--hf", d, "--out", str(tmp_path / "o")]) == 2
    assert (f"{path}: num_experts_per_tok=4 must be in [1, num_local_experts=3]"
            in capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "o")
