"""GritLM-8x7B: Mixtral-8x7B init, bbcc + mean pooling, `token` LM loss x 0.003, split_emb.

Embedding batch 256 queries (x2 passages) + 256 generative per step, lengths 256/2048/2048,
queries and passages back-propagated in two passes, the router's load-balancing loss (Mixtral's
coefficient 0.02) on the generative pass, bf16 compute over float32 master weights; the
optimiser settings and step count are GritLM-7B's (the paper gives no separate ones). The mesh
is pure FSDP (expert=1: every device gathers a layer's experts like any other weight and runs its
own tokens through the megablox kernels on TPU). Memory/speed knobs per TPU slice as in
gritlm_7b.py (default: v5p-128).

python -m grit_jax.train --config configs/gritlm_8x7b.py:v5p-128 --workdir gs://BUCKET/gritlm8x7b \\
    --config.init_from=/path/to/Mixtral-8x7B-v0.1 --config.data.data_dir=gs://BUCKET/data
"""

from configs import gritlm_7b

# Slice -> (remat_policy, logits_chunk) (benchmarks/results/aot/gritlm_8x7b_*.json). v5p-64 is
# the smallest v5p slice the step fits (full remat: 71.7 of 95 GiB per chip); v5p-128 keeps its
# knobs. v6e-128 is the smallest v6e slice it fits (19.8 of 32 GiB; v6e-64 needs 36.6 GiB, with
# tensor=2 42.3: results/aot/gritlm_8x7b_v6e_*.json).
PRESETS = {
    "v5p-64": ("full", 1024),
    "v5p-128": ("full", 1024),
    "v6e-128": ("full", 1024),
}


def get_config(slice_name: str = "v5p-128"):
    if slice_name not in PRESETS:
        raise ValueError(f"configs/gritlm_8x7b.py:{slice_name}: no preset for this slice "
                         f"(presets: {', '.join(PRESETS)}); tune one with benchmarks/aot_tune.py")
    remat, logits_chunk = PRESETS[slice_name]
    c = gritlm_7b.get_config()
    c.init_from = "/path/to/Mixtral-8x7B-v0.1"
    # Used only without init_from (and by ahead-of-time compilation): Mixtral-8x7B's shape.
    c.model.update(dict(family="mixtral", rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                        router_aux_loss_coef=0.02, moe_impl="auto", remat_policy=remat))
    c.data.update(dict(query_batch=256, generative_batch=256, group_size=2))
    c.loss.update(dict(lambda_gen=0.003, gen_aggregation="token", grad_cache_chunk=0,
                       split_emb=True, logits_chunk=logits_chunk))
    return c
