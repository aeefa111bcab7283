"""QLoRA-style int8 base: the rounding bound, the model equals its dequantized weights, only
adapters train, a float checkpoint quantizes on load, and the merged export runs in transformers."""

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


def test_rounding_is_within_half_a_step():
    w = np.random.RandomState(0).randn(3, 16, 4, 5).astype(np.float32)  # (layers, in, out...)
    q, scale = quant.quantize_weight(w, 1)
    assert q.dtype == jnp.int8 and scale.shape == (3, 4, 5)
    back = np.asarray(quant.dequantize_weight(q, scale, 1, jnp.float32))
    step = np.asarray(scale)[:, None]
    # |w - q s| <= s / 2, plus the float32 rounding of w / s and of q * s.
    assert np.all(np.abs(w - back) <= step / 2 * (1 + 1e-6) + 4 * np.finfo(np.float32).eps * np.abs(w))
    assert np.abs(q).max() == 127


def test_int8_model_equals_its_dequantized_weights_and_only_adapters_train():
    params = adapted(QCFG)
    flat = flax.traverse_util.flatten_dict(params)
    assert flat[("layers", "attn", "q")].dtype == jnp.int8
    assert flat[("layers", "attn", "q_scale")].shape == (2, 8, 8)
    plain, cfg = quant.dequantize(params, QCFG)
    ids = np.random.RandomState(0).randint(0, 512, (2, 9))
    np.testing.assert_allclose(np.asarray(forward(params, QCFG, ids).hidden),
                               np.asarray(forward(plain, cfg, ids).hidden), atol=1e-6)
    tx, schedule = make_optimizer(3e-3, total_steps=10, warmup_ratio=0.0)
    state = init_state(params, tx)
    step = jax.jit(lambda s, x: train_step(s, x, config=QCFG, lc=LossConfig(), tx=tx,
                                           schedule=schedule))
    for _ in range(2):
        state, m = step(state, make_batch())
    after = flax.traverse_util.flatten_dict(state["params"])
    for path, x in flat.items():
        same = np.array_equal(np.asarray(x), np.asarray(after[path]))
        assert same != lora.is_adapter(path), path
        assert after[path].dtype == x.dtype
    assert np.isfinite(float(m["loss"]))


def test_float_checkpoint_quantizes_on_load_and_exports_merged(mistral_dir, tmp_path):
    """init_from a float Hugging Face model with base_quant='int8' (and new adapters): the
    weights arrive int8 within half a step of the originals, sharded; the merged export loads
    in transformers with our logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from grit_jax import checkpoint, sharding
    from grit_jax.convert.hf import grit_to_hf
    from grit_jax.train_step import state_shardings
    from tests import hf_models

    base, base_cfg = weights.load(mistral_dir)
    cfg = base_cfg.replace(lora_rank=2, lora_targets="q,v,down", base_quant="int8")
    mesh = sharding.make_mesh((4, 2, 1))
    sh = state_shardings(cfg, make_optimizer(1e-3, 10)[0], mesh)["params"]
    params = weights.load_params(mistral_dir, cfg, sh, new_params_seed=0)
    flat, ref = (flax.traverse_util.flatten_dict(t) for t in (params, base))
    for path, n_in in quant._paths(flat):
        q, s = flat[path], flat[path[:-1] + (path[-1] + quant.SCALE,)]
        assert q.dtype == jnp.int8 and q.sharding == flax.traverse_util.flatten_dict(sh)[path]
        err = np.abs(np.asarray(quant.dequantize_weight(q, s, n_in, jnp.float32)) - ref[path])
        assert np.all(err <= np.expand_dims(np.asarray(s), tuple(range(1, 1 + n_in))) * 0.5001)
    rng = np.random.RandomState(1)
    flat = {p: (jnp.asarray(0.05 * rng.randn(*v.shape), v.dtype) if lora.is_adapter(p) else v)
            for p, v in flat.items()}
    params = jax.device_get(flax.traverse_util.unflatten_dict(flat))
    checkpoint.save_params(str(tmp_path / "p"), params, cfg)
    grit_to_hf(str(tmp_path / "p"), str(tmp_path / "hf"), tokenizer=mistral_dir)
    ids = np.random.RandomState(0).randint(3, 32000, (2, 11))
    valid = np.ones_like(ids, bool)
    ours = np.asarray(logits_fn(params, cfg, forward(params, cfg, ids, valid).hidden))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    diff = np.abs(hf_models.hf_logits(merged, ids, valid) - ours).max()
    print(f"int8 + LoRA merged export vs ours: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_int8_needs_adapters():
    with pytest.raises(ValueError, match="needs lora_rank > 0"):
        BASE.replace(base_quant="int8")
