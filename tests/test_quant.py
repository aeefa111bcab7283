"""QLoRA-style quantized base (int8, int4, nf4 through qwix): the rounding bound, the model
equals its dequantized weights, only adapters train, a float checkpoint quantizes on load, and the
merged export runs in transformers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax import lora, quant, weights
from grit_jax.model import forward, logits_fn
from grit_jax.train_step import LossConfig, init_state, make_optimizer, train_step
from tests.test_lora import ALL, BASE, adapted
from tests.test_train_step import make_batch

QCFG = BASE.replace(lora_rank=4, lora_targets=ALL, base_quant="int8")
KINDS = ("int8", "int4", "nf4")


def expand(scale, shape):
    """Scales repeated over the inputs they cover: one per weight element."""
    for axis, (n, m) in enumerate(zip(shape, np.shape(scale))):
        scale = np.repeat(scale, n // m, axis=axis)
    return scale


def half_gap(cfg):
    """Half the widest gap between neighbouring levels (at scale 1): the rounding bound."""
    return np.diff(quant.levels(cfg)).max() / 2


@pytest.mark.parametrize("kind", KINDS)
def test_rounding_is_to_a_neighbouring_level(kind):
    """Every element lands within half a gap of levels of its own scale; each block's (int8:
    channel's) largest magnitude sets the scale, so it lands on an extreme code."""
    cfg = QCFG.replace(base_quant=kind, quant_block=8)
    w = np.random.RandomState(0).randn(3, 16, 4, 5).astype(np.float32)  # (layers, in, out...)
    q, scale = quant.quantize_weight(w, 1, cfg)
    assert q.dtype == quant.STORAGE[kind] and q.shape == w.shape
    assert scale.shape == ((3, 1, 4, 5) if kind == "int8" else (3, 2, 4, 5))
    assert scale.shape == quant.scale_shape(w.shape, 1, cfg)
    back = np.asarray(quant.dequantize_weight(q, scale, cfg, jnp.float32))
    s = expand(np.asarray(scale), w.shape)
    # |w - back| <= s * half_gap, plus the float32 rounding of w / s and of level * s.
    eps = 4 * np.finfo(np.float32).eps
    assert np.all(np.abs(w - back) <= s * half_gap(cfg) * (1 + 1e-6) + eps * np.abs(w))
    lo, hi, _ = quant.code_range(cfg)
    codes = np.asarray(q.astype(jnp.int32))
    assert codes.min() == lo if kind == "nf4" else codes.min() >= lo  # int: -127 (-7) at least
    assert codes.max() == hi


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_model_equals_its_dequantized_weights_and_only_adapters_train(kind):
    cfg = QCFG.replace(base_quant=kind, quant_block=16)
    params = adapted(cfg)
    flat = flax.traverse_util.flatten_dict(params)
    assert flat[("layers", "attn", "q")].dtype == quant.STORAGE[kind]
    assert flat[("layers", "attn", "q_scale")].shape == ((2, 1, 8, 8) if kind == "int8"
                                                         else (2, 4, 8, 8))
    assert flat[("layers", "attn", "o_scale")].shape == ((2, 1, 1, 64) if kind == "int8"
                                                         else (2, 8, 1, 64))
    plain, plain_cfg = quant.dequantize(params, cfg)
    ids = np.random.RandomState(0).randint(0, 512, (2, 9))
    np.testing.assert_allclose(np.asarray(forward(params, cfg, ids).hidden),
                               np.asarray(forward(plain, plain_cfg, ids).hidden), atol=1e-6)
    tx, schedule = make_optimizer(3e-3, total_steps=10, warmup_ratio=0.0)
    state = init_state(params, tx)
    step = jax.jit(lambda s, x: train_step(s, x, config=cfg, lc=LossConfig(), tx=tx,
                                           schedule=schedule))
    for _ in range(2):
        state, m = step(state, make_batch())
    after = flax.traverse_util.flatten_dict(state["params"])
    for path, x in flat.items():
        same = np.array_equal(np.asarray(x), np.asarray(after[path]))
        assert same != lora.is_adapter(path), path
        assert after[path].dtype == x.dtype
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("kind,block", [("int8", 64), ("nf4", 12)])
def test_float_checkpoint_quantizes_on_load_and_exports_merged(mistral_dir, tmp_path, kind,
                                                               block):
    """init_from a float Hugging Face model with base_quant (and new adapters): the weights
    arrive quantized within half a gap of the originals, sharded (nf4: block scales over the
    fsdp axis too); the merged export loads in transformers with our logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from grit_jax import checkpoint, sharding
    from grit_jax.convert.hf import grit_to_hf
    from grit_jax.train_step import state_shardings
    from tests import hf_models

    base, base_cfg = weights.load(mistral_dir)
    cfg = base_cfg.replace(lora_rank=2, lora_targets="q,v,down", base_quant=kind,
                           quant_block=block)
    mesh = sharding.make_mesh((4, 2, 1))
    sh = state_shardings(cfg, make_optimizer(1e-3, 10)[0], mesh)["params"]
    params = weights.load_params(mistral_dir, cfg, sh, new_params_seed=0)
    flat, ref = (flax.traverse_util.flatten_dict(t) for t in (params, base))
    flat_sh = flax.traverse_util.flatten_dict(sh)
    for path, n_in in quant._paths(flat):
        scale_path = path[:-1] + (path[-1] + quant.SCALE,)
        q, s = flat[path], flat[scale_path]
        assert q.dtype == quant.STORAGE[kind] and q.sharding == flat_sh[path]
        assert s.sharding == flat_sh[scale_path]
        err = np.abs(np.asarray(quant.dequantize_weight(q, s, cfg, jnp.float32)) - ref[path])
        assert np.all(err <= expand(np.asarray(s), q.shape) * half_gap(cfg) * 1.0001)
    rng = np.random.RandomState(1)
    flat = {p: (jnp.asarray(0.05 * rng.randn(*v.shape), v.dtype) if lora.is_adapter(p) else v)
            for p, v in flat.items()}
    params = jax.device_get(flax.traverse_util.unflatten_dict(flat))
    checkpoint.save_params(params, cfg, str(tmp_path / "p"))
    grit_to_hf(str(tmp_path / "p"), str(tmp_path / "hf"), tokenizer=mistral_dir)
    ids = np.random.RandomState(0).randint(3, 32000, (2, 11))
    valid = np.ones_like(ids, bool)
    ours = np.asarray(logits_fn(params, cfg, forward(params, cfg, ids, valid).hidden))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    diff = np.abs(hf_models.hf_logits(merged, ids, valid) - ours).max()
    print(f"{kind} + LoRA merged export vs ours: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_quantized_base_needs_adapters_and_whole_blocks():
    with pytest.raises(ValueError, match="needs lora_rank > 0"):
        BASE.replace(base_quant="int8")
    with pytest.raises(ValueError, match="intermediate_size=128 is not a multiple of "
                                         "quant_block=48"):
        QCFG.replace(base_quant="nf4", quant_block=48)
    QCFG.replace(base_quant="nf4", quant_block=256)  # longer than every axis: one block each


def test_block_scales_that_do_not_divide_over_the_mesh_fail_before_compiling():
    from grit_jax import sharding
    from grit_jax.train_step import state_shardings

    cfg = QCFG.replace(base_quant="int4", quant_block=32)  # embed 64 -> 2 blocks, over fsdp 4
    with pytest.raises(ValueError, match="q_scale.*embed=2.*fsdp"):
        state_shardings(cfg, make_optimizer(1e-3, 10)[0], sharding.make_mesh((2, 4, 1)))
