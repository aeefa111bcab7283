"""Adapt SmolLM2-135M-Instruct to your documents with GRIT LoRA (the adaptation study,
benchmarks/adapt_study.py). Three settings:

- ``cpu`` (default, sized for 2 CPU cores: ~20 s a step): rank-16 adapters on every projection,
  16 queries x (passage + hard negative) per step through GradCache chunks of 8 (31 in-batch
  passages per query), 4 generative samples, 48 optimizer steps; one padded shape per kind
  (query 48, passage 96, generative 128 tokens) so one compiled step.
- ``demo`` (``make demo``): 26 steps of 4 queries x 1 passage and 4 generative samples of up
  to 192 tokens drawn mostly from ``adapt_rag`` (answers from a passage in GRIT's RAG layouts),
  their cached documents read bidirectionally (``gen_attention="context"``), as doc caching
  reads them.
- ``accelerator`` (one GPU/TPU chip): 256 queries x 2 passages through GradCache chunks of 32
  (511 passages per query, the in-batch scale the paper's recipe relies on), 32 generative
  samples, passages of 256 tokens, 1000 steps.

python -m grit_jax.data adapt --input DOCS --output /tmp/adapted --build --tokenizer /tmp/smollm2 \\
    --passage-words 64 --max-query-length 48 --max-passage-length 96 --max-generative-length 128
python -m grit_jax.train --config configs/smollm2_adapt.py --workdir /tmp/smol_adapt \\
    --config.init_from=/tmp/smollm2 --config.data.data_dir=/tmp/adapted/train
"""

from configs import smollm2_grit_lora

# What a setting does not name (the mixture: every example once per epoch).
DEFAULTS = dict(mixture="", gen_attention="causal", lr=5e-4, clip_norm=1.0, group_size=2)
PRESETS = {
    "cpu": dict(steps=48, query_batch=16, generative_batch=4, chunk=8,
                buckets=dict(query="48", passage="96", generative="128")),
    # make demo: many small steps (~7.5 s each on 2 cores). Doc-cached answers learn to stop at
    # EOS after 26-30 optimizer steps (6 of 8 held-out questions either way); 6 larger ones
    # taught the passage's words, not the stop (benchmarks/doc_cache_trial.py, docs/demo.md).
    # No hard negative: the steps fit in the demo's time.
    "demo": dict(steps=26, query_batch=4, group_size=1, generative_batch=4, chunk=0,
                 buckets=dict(query="48", passage="96", generative="192"),
                 mixture="adapt_text=0.1x,adapt_chat=0.2x,adapt_rag=4x",  # mostly RAG chats
                 gen_attention="context"),  # their cached documents read as doc caching does
    "accelerator": dict(steps=1000, query_batch=256, generative_batch=32, chunk=32,
                        buckets=dict(query="64", passage="256", generative="512")),
}


def get_config(setting: str = "cpu"):
    if setting not in PRESETS:
        raise ValueError(f"configs/smollm2_adapt.py:{setting}: no such setting "
                         f"(settings: {', '.join(PRESETS)})")
    p = {**DEFAULTS, **PRESETS[setting]}
    c = smollm2_grit_lora.get_config()
    c.total_steps = p["steps"]
    c.checkpoint_every = p["steps"]
    c.model.update(dict(lora_rank=16, lora_alpha=32.0))
    c.data.update(dict(query_batch=p["query_batch"], generative_batch=p["generative_batch"],
                       group_size=p["group_size"]))
    c.data.buckets.update(p["buckets"])
    c.data.mixture = p["mixture"]
    c.loss.update(dict(grad_cache_chunk=p["chunk"], gen_attention=p["gen_attention"]))
    c.optim.update(dict(lr=p["lr"], clip_norm=p["clip_norm"], warmup_ratio=0.1))
    return c
