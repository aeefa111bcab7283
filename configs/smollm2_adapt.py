"""Adapt SmolLM2-135M-Instruct to your documents with GRIT LoRA on CPU (the adaptation study,
benchmarks/adapt_study.py): rank-16 adapters on every projection, 32 queries x 2 passages per
step through GradCache chunks of 16 (31 negatives per query), 4 generative samples, one padded
shape per kind (one compiled step).

python -m grit_jax.data.adapt --input DOCS --output /tmp/adapted --build --tokenizer /tmp/smollm2 \\
    --max-query-length 64 --max-passage-length 128 --max-generative-length 128
python -m grit_jax.train --config configs/smollm2_adapt.py --workdir /tmp/smol_adapt \\
    --config.init_from=/tmp/smollm2 --config.data.data_dir=/tmp/adapted/train
"""

from configs import smollm2_grit_lora


def get_config():
    c = smollm2_grit_lora.get_config()
    c.total_steps = 150
    c.checkpoint_every = 150
    c.model.update(dict(lora_rank=16, lora_alpha=32.0))
    c.data.update(dict(query_batch=32, generative_batch=4, group_size=2))
    c.data.buckets.update(dict(query="64", passage="128", generative="128"))
    c.loss.update(dict(grad_cache_chunk=16))
    c.optim.update(dict(lr=5e-4, warmup_ratio=0.1))
    return c
