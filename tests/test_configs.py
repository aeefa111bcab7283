"""Every shipped config loads, names only known fields and builds its model and loss configs."""

import importlib

import pytest

from grit_jax.config import ModelConfig
from grit_jax.train_step import LossConfig


@pytest.mark.parametrize("name", ["tiny", "tiny_embedding", "tiny_generative",
                                  "tiny_cccc_weightedmean", "smollm2_grit", "gritlm_7b", "tiny_moe",
                                  "gritlm_8x7b", "smollm2_grit_lora", "gritlm_7b_lora",
                                  "smollm2_adapt"])
def test_config_builds(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    model = ModelConfig(**c.model.to_dict())
    loss = LossConfig(**c.loss.to_dict())
    for key in ("total_steps", "checkpoint_every", "seed", "mesh", "init_from"):
        assert key in c
    if name == "gritlm_7b":
        assert 7.0e9 < model.num_params() < 7.5e9
        assert (loss.grad_cache_chunk, c.data.query_batch, c.optim.lr) == (256, 2048, 2e-5)
    if name == "gritlm_7b_lora":  # rank 16 on all 7 projections of 32 layers: 41.9M adapters
        assert model.num_layers * model.lora_params_per_layer() == 41_943_040
        assert model.param_dtype == "bfloat16" and loss.grad_cache_chunk == 64
        assert model.base_quant == "nf4" and model.quant_block == 64
    if name == "gritlm_8x7b":  # Mixtral-8x7B: 46.7B parameters, 12.9B active per token
        assert 46.5e9 < model.num_params() < 47e9
        assert 12.8e9 < model.num_params(active=True) < 13e9
        assert (loss.lambda_gen, loss.gen_aggregation, loss.split_emb) == (0.003, "token", True)


def test_adapt_settings():
    """The adaptation study's accelerator setting differs from the CPU one only in scale."""
    cfg = importlib.import_module("configs.smollm2_adapt")
    cpu, acc = cfg.get_config(), cfg.get_config("accelerator")
    assert (cpu.data.query_batch, acc.data.query_batch) == (16, 256)
    assert acc.loss.grad_cache_chunk == 32 and acc.model.lora_rank == cpu.model.lora_rank == 16
    with pytest.raises(ValueError, match="settings: cpu, demo, accelerator"):
        cfg.get_config("tpu")


def test_float64_needs_x64():
    import jax

    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="JAX_ENABLE_X64=1"):
        ModelConfig(**dict(importlib.import_module("configs.tiny").get_config().model.to_dict(),
                           dtype="float64"))
