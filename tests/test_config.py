"""grit_jax.config: ModelConfig refuses what cannot be built, round-trips through JSON, and
counts the parameters the model initialises."""

import jax
import pytest

from grit_jax.config import ModelConfig, tiny_config
from grit_jax.model import init_params


def test_config_validation_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(remat_policy="sometimes")
    cfg = tiny_config(family="llama", rope_scaling=None)
    cfg.save(str(tmp_path))
    assert ModelConfig.load(str(tmp_path)) == cfg
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(init_params(cfg)))
