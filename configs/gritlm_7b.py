"""GritLM-7B as in the paper: Mistral-7B init, bbcc + mean pooling, mixed LM loss, GradCache.

Batch 2048 queries (x2 passages) + 256 generative per step, lengths 256/2048/2048, lr 2e-5 with
3% warmup then linear decay, 1253 steps, Adam (0.9, 0.999), no weight decay, clip 1.0, bf16
compute over float32 master weights, full activation checkpointing. Set the paths:

python -m grit_jax.train --config configs/gritlm_7b.py --workdir /gcs/BUCKET/gritlm7b \\
    --config.init_from=/path/to/Mistral-7B-v0.1 --config.data.data_dir=/path/to/built_e5_tulu
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 1253
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.log_every = 1
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    c.init_from = "/path/to/Mistral-7B-v0.1"  # a Hugging Face directory or params checkpoint
    # Used only without init_from (and by ahead-of-time compilation): Mistral-7B-v0.1's shape.
    c.model.update(dict(family="mistral", vocab_size=32000, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        max_position_embeddings=32768, param_dtype="float32", dtype="bfloat16",
                        remat_policy="full"))
    c.data.update(dict(data_dir="/path/to/built_data", query_batch=2048, generative_batch=256,
                       group_size=2, num_threads=8))
    c.loss.update(dict(mode="unified", attn="bbcc", pooling="mean", temperature=0.02,
                       lambda_gen=1.0, gen_aggregation="mixed", gen_sub_batch=32,
                       # GradCache chunks are global and split over the data-parallel devices:
                       # 256 = 4 sequences per chip on 64 chips (2 per device on 128).
                       grad_cache_chunk=256))
    c.optim.update(dict(lr=2e-5, warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999,
                        clip_norm=1.0))
    return c
