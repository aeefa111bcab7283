"""GritLM-8x7B: Mixtral-8x7B init, bbcc + mean pooling, `token` LM loss x 0.003, split_emb.

Embedding batch 256 queries (x2 passages) + 256 generative per step, lengths 256/2048/2048,
queries and passages back-propagated in two passes, the router's load-balancing loss (Mixtral's
coefficient 0.02) on the generative pass, bf16 compute over float32 master weights, full
activation checkpointing. The mesh is pure FSDP (expert=1: every device gathers a layer's
experts like any other weight and runs its own tokens through the megablox kernels on TPU):
AOT-compiled for v5p this needs less memory and no extra expert work, where expert parallelism
(mesh.expert=8) runs each device's experts over its whole expert group's rows (see the README).
The optimiser settings and step count are GritLM-7B's (the paper gives no separate ones for
8x7B). Set the paths:

python -m grit_jax.train --config configs/gritlm_8x7b.py --workdir /gcs/BUCKET/gritlm8x7b \\
    --config.init_from=/path/to/Mixtral-8x7B-v0.1 --config.data.data_dir=/path/to/built_data
"""

from configs import gritlm_7b


def get_config():
    c = gritlm_7b.get_config()
    c.init_from = "/path/to/Mixtral-8x7B-v0.1"
    c.mesh.update({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1})
    # Used only without init_from (and by ahead-of-time compilation): Mixtral-8x7B's shape.
    c.model.update(dict(family="mixtral", vocab_size=32000, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        max_position_embeddings=32768, rope_theta=1e6, num_experts=8,
                        num_experts_per_tok=2, router_aux_loss_coef=0.02, moe_impl="auto",
                        param_dtype="float32", dtype="bfloat16", remat_policy="full"))
    c.data.update(dict(query_batch=256, generative_batch=256, group_size=2))
    c.loss.update(dict(mode="unified", attn="bbcc", pooling="mean", temperature=0.02,
                       lambda_gen=0.003, gen_aggregation="token", grad_cache_chunk=0,
                       split_emb=True))
    return c
