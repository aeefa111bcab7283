"""The CPU default: a small Mistral-architecture model trained with GRIT on the Wikipedia demo set.

python -m demo.wikipedia --out /tmp/wiki    # the demo set, built once
python -m grit_jax.train --config configs/tiny.py --workdir /tmp/tiny \\
    --config.data.data_dir=/tmp/wiki/train [--config.total_steps=50]
"""

from configs import base


def get_config():
    c = base.get_config()
    c.total_steps = 200
    c.model.update(dict(family="mistral", vocab_size=32000, hidden_size=128,
                        intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=2048))
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.1))
    return c
