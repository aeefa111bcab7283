"""GRIT LoRA finetune of SmolLM2-135M-Instruct on CPU: configs/smollm2_grit.py with rank-8
adapters on every projection; only the adapters (2.4M, 1.8% of the weights) train.

python -m grit_jax.train --config configs/smollm2_grit_lora.py --workdir /tmp/smol_lora \\
    --config.init_from=/tmp/smollm2 --config.data.data_dir=/tmp/smol_data/train
python -m grit_jax.convert grit-to-hf --workdir /tmp/smol_lora --out /tmp/smol_lora_hf
"""

from configs import smollm2_grit


def get_config():
    c = smollm2_grit.get_config()
    c.model.update(dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                        lora_targets="q,k,v,o,gate,up,down"))
    c.optim.update(dict(lr=3e-4))
    return c
