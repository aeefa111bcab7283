"""The CPU default: a small Mistral-architecture model trained with GRIT on the Wikipedia demo set.

python -m grit_jax.train --config configs/tiny.py --workdir /tmp/tiny [--config.total_steps=50]
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 200
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.log_every = 10
    c.peak_flops = 0.0  # per device; 0: look the device up (TPU, H100, ...), none on CPU
    # Device mesh inside a slice; dcn_mesh: across slices (multislice pods: the data-centre
    # network carries only data parallelism by default).
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1})
    c.dcn_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    c.checkpoint_every_minutes = 0.0  # also save when this much time passed (0: off)
    # A params directory or Hugging Face directory to start from; "" = random init of `model`.
    c.init_from = ""
    c.model = ml_collections.ConfigDict(dict(
        family="mistral", vocab_size=32000, hidden_size=128, intermediate_size=352, num_layers=4,
        num_heads=4, num_kv_heads=2, max_position_embeddings=2048, param_dtype="float32",
        dtype="float32", remat_policy="none",
        attention_impl="auto"))  # auto: blocked on CPU, splash on TPU (grit_jax/attention.py)
    # "demo": build the Wikipedia demo set into WORKDIR/data on first use.
    c.data = ml_collections.ConfigDict(dict(
        data_dir="demo", query_batch=8, generative_batch=8, group_size=2, num_threads=2,
        # Padded lengths per kind, e.g. passage="512,1024,2048" ("": powers of two from 16).
        buckets=ml_collections.ConfigDict({"query": "", "passage": "", "generative": ""})))
    c.loss = ml_collections.ConfigDict(dict(
        mode="unified", attn="bbcc", pooling="mean", normalize=True, temperature=0.02,
        lambda_gen=1.0, gen_aggregation="mixed", gen_sub_batch=32, grad_cache_chunk=0,
        split_emb=False, logits_chunk=1024))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0))
    return c
