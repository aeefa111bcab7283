"""LoRA: adapters change nothing at init, equal merged weights (values and gradients, float64),
only adapters train and hold optimizer state, dropout, and the merged and PEFT exports against
transformers and peft."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax import lora, weights
from grit_jax.config import tiny_config
from grit_jax.model import forward, init_params, logits_fn
from grit_jax.train_step import LossConfig, init_state, loss_and_grads, make_optimizer, train_step
from tests.test_train_step import make_batch
from tests.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

ALL = "q,k,v,o,gate,up,down"
BASE = tiny_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=8, num_kv_heads=4)


def adapted(cfg, seed=1, scale=0.05):
    """Params of cfg with every adapter random (B is zero at init: make the adapters matter)."""
    params = init_params(cfg, seed=seed)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(scale * rng.randn(*x.shape), x.dtype)
        if lora.ADAPTER in jax.tree_util.keystr(path) else x, params)


def test_new_adapters_leave_the_model_unchanged():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL)
    params = init_params(cfg, seed=1)
    base = lora.merge(params, cfg)[0]
    ids = np.random.RandomState(0).randint(0, 512, (2, 9))
    np.testing.assert_array_equal(np.asarray(forward(params, cfg, ids).hidden),
                                  np.asarray(forward(base, BASE, ids).hidden))
    flat = flax.traverse_util.flatten_dict(params)
    assert flat[("layers", "attn", "q_lora_a")].shape == (2, 64, 4)
    assert flat[("layers", "attn", "o_lora_a")].shape == (2, 8, 8, 4)
    assert flat[("layers", "mlp", "down_lora_b")].shape == (2, 4, 64)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("targets", [ALL, "q,v"])
def test_adapters_equal_merged_weights_values_and_gradients(targets):
    """The adapted model equals plain weights W + (alpha / r) A B, and its loss gradients are
    the gradients w.r.t. A and B through that merge (an unfused reference), float64."""
    with jax.enable_x64(True):
        cfg = BASE.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets, dtype="float64",
                           param_dtype="float64")
        params, b = adapted(cfg), make_batch()
        merged, plain_cfg = lora.merge(params, cfg)
        ids, valid = b["gen_ids"], b["gen_valid"]
        for mode in ("causal", "bidirectional"):
            got = forward(params, cfg, ids, valid, mode=mode).hidden
            want = forward(merged, plain_cfg, ids, valid, mode=mode).hidden
            np.testing.assert_allclose(np.asarray(got) * valid[..., None],
                                       np.asarray(want) * valid[..., None], rtol=1e-10, atol=1e-10)
        lc = LossConfig(gen_sub_batch=4)
        metrics, grads = jax.jit(loss_and_grads, static_argnums=(1, 2))(params, cfg, lc, b)
        train, frozen = lora.partition(params)
        trained = {"/".join(p) for p in flax.traverse_util.flatten_dict(grads)}
        assert trained == {"/".join(p) for p in flax.traverse_util.flatten_dict(train)}
        assert all(lora.ADAPTER in p for p in trained) and frozen

        def through_merge(tr):
            return loss_and_grads(lora.merge(lora.combine(tr, frozen), cfg)[0], plain_cfg, lc,
                                  b)[0]["loss"]

        want = jax.jit(jax.grad(through_merge))(train)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL), grads, want)


def test_only_adapters_train_and_hold_optimizer_state():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL, projection_dim=16)
    params = init_params(cfg, seed=1)
    tx, schedule = make_optimizer(3e-3, total_steps=10, warmup_ratio=0.0)
    state = init_state(params, tx)
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    trainable = sum(x.size for x in jax.tree.leaves(lora.partition(params)[0]))
    assert moments == 2 * trainable  # Adam's two moments, for adapters + the head only
    assert trainable == 2 * cfg.lora_params_per_layer() + (64 + 1) * 16
    step = jax.jit(lambda s, x: train_step(s, x, config=cfg, lc=LossConfig(), tx=tx,
                                           schedule=schedule))
    first = None
    for _ in range(6):
        state, m = step(state, make_batch())
        first = first or float(m["loss"])
    before, after = (flax.traverse_util.flatten_dict(t) for t in (params, state["params"]))
    for path, x in before.items():
        changed = not np.array_equal(np.asarray(x), np.asarray(after[path]))
        assert changed == lora.is_trainable(path, True), path
    assert float(m["loss"]) < first


def test_dropout_only_with_a_key_and_the_same_for_the_same_key():
    cfg = BASE.replace(lora_rank=4, lora_dropout=0.5, lora_targets=ALL)
    params, ids = adapted(cfg, scale=0.5), np.random.RandomState(0).randint(0, 512, (2, 9))
    run = lambda rng: np.asarray(forward(params, cfg, ids, dropout_rng=rng).hidden)  # noqa: E731
    none, a, a2, b = run(None), run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)), run(
        jax.random.PRNGKey(2))
    np.testing.assert_array_equal(none, np.asarray(forward(params, cfg.replace(lora_dropout=0.0),
                                                           ids).hidden))
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - none).max() > 1e-3 and np.abs(a - b).max() > 1e-3


def test_adapters_shard_by_the_logical_rules():
    from grit_jax import sharding
    from grit_jax.train_step import state_shardings

    cfg = BASE.replace(lora_rank=4, lora_targets=ALL)
    mesh = sharding.make_mesh((1, 4, 2))
    tx, _ = make_optimizer(1e-3, 10)
    sh = flax.traverse_util.flatten_dict(state_shardings(cfg, tx, mesh)["params"])
    spec = lambda *p: tuple(sh[p].spec)  # noqa: E731
    assert spec("layers", "attn", "q_lora_a") == (None, "fsdp", None)
    assert spec("layers", "attn", "q_lora_b") == (None, None, "tensor", None)
    assert spec("layers", "mlp", "down_lora_a") == (None, "tensor", None)


def test_invalid_lora_configs():
    with pytest.raises(ValueError, match="lora_targets='q,x'"):
        BASE.replace(lora_rank=4, lora_targets="q,x")
    with pytest.raises(ValueError, match="lora_dropout=1.0"):
        BASE.replace(lora_rank=4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="mixture of experts' MLP projections"):
        tiny_config("mixtral", lora_rank=4, lora_targets="q,gate")


def test_exports_merged_and_peft_load_in_transformers_and_peft(mistral_dir, tmp_path):
    """A LoRA model on a transformers checkpoint: the default export (merged weights) gives our
    logits in transformers, and the adapters alone load with peft.PeftModel on the base model
    with the same logits; GritLM embeddings of the merged export equal ours."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grit_jax import checkpoint
    from grit_jax.convert.hf import grit_to_hf
    from grit_jax.inference import GritLM
    from tests import hf_models

    base_params, base_cfg = weights.load(mistral_dir)
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    params = init_params(cfg, seed=2)  # adapter shapes; the body from the checkpoint
    flat = flax.traverse_util.flatten_dict(params)
    rng = np.random.RandomState(3)
    for path, x in flax.traverse_util.flatten_dict(base_params).items():
        flat[path] = x
    for path in [p for p in flat if lora.is_adapter(p)]:
        flat[path] = jnp.asarray(0.05 * rng.randn(*flat[path].shape), jnp.float32)
    params = flax.traverse_util.unflatten_dict(flat)
    checkpoint.save_params(params, cfg, str(tmp_path / "p"))
    grit_to_hf(str(tmp_path / "p"), str(tmp_path / "merged"), tokenizer=mistral_dir)
    grit_to_hf(str(tmp_path / "p"), str(tmp_path / "peft"), tokenizer=mistral_dir,
               adapters_only=True, base_model=mistral_dir)

    ids = np.random.RandomState(0).randint(3, 32000, (2, 11))
    valid = np.ones_like(ids, bool)
    valid[1, 7:] = False
    ours = np.asarray(logits_fn(params, cfg, forward(params, cfg, ids, valid).hidden))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf_models.build("mistral", seed=0),
                                     str(tmp_path / "peft")).eval()
    v = valid[..., None]
    for name, model in (("merged", merged.eval()), ("peft", peft)):
        got = hf_models.hf_logits(model, ids, valid)
        diff = np.abs((got - ours) * v).max()
        print(f"LoRA {name} export vs ours: max |logit diff| {diff:.2e}")
        assert diff < 1e-4
    plain = np.asarray(logits_fn(base_params, base_cfg,
                                 forward(base_params, base_cfg, ids, valid).hidden))
    assert np.abs((plain - ours) * v).max() > 1e-2  # the adapters matter
    texts = ["Paris is the capital of France.", "Vaccines train the immune system."]
    ours_emb = GritLM(params, cfg, hf_models_tokenizer(mistral_dir)).encode(texts)
    merged_emb = GritLM.from_pretrained(str(tmp_path / "merged")).encode(texts)
    np.testing.assert_allclose(merged_emb, ours_emb, atol=1e-5)


def hf_models_tokenizer(path):
    from grit_jax.data.tokenizers import load_tokenizer

    return load_tokenizer(path)
