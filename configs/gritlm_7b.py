"""GritLM-7B as in the paper: Mistral-7B init, bbcc + mean pooling, mixed LM loss, GradCache.

Batch 2048 queries (x2 passages) + 256 generative per step, lengths 256/2048/2048, lr 2e-5 with
3% warmup then linear decay, 1253 steps, Adam (0.9, 0.999), no weight decay, clip 1.0, bf16
compute over float32 master weights. The memory/speed knobs (remat policy, GradCache chunk,
LM-head chunk) are tuned per TPU slice by ahead-of-time compilation (benchmarks/aot_tune.py;
README, TPU performance): name the slice after the file, default v5p-128.

python -m grit_jax.train --config configs/gritlm_7b.py:v5p-128 --workdir gs://BUCKET/gritlm7b \\
    --config.init_from=/path/to/Mistral-7B-v0.1 --config.data.data_dir=gs://BUCKET/data
"""

from configs import base

# Slice -> (remat_policy, grad_cache_chunk, logits_chunk): the fastest compiled step that leaves
# >= 10% of HBM free. v5p-64: swept by benchmarks/aot_tune.py (results/aot/tune_gritlm_7b_v5p-64
# .json: minimal 59.5 s vs full 63.0 s; GradCache chunk 1024 needs 186 GiB). v5p-128 takes the
# same knobs (half the per-chip activations and state). v6e-64 (32 GiB chips): full remat,
# compiled at 11.6 GiB (results/aot/gritlm_7b_v6e_8x8.json); minimal needs ~2x that.
PRESETS = {
    "v5p-64": ("minimal", 256, 4096),
    "v5p-128": ("minimal", 256, 4096),
    "v6e-64": ("full", 256, 1024),
}


def get_config(slice_name: str = "v5p-128"):
    if slice_name not in PRESETS:
        raise ValueError(f"configs/gritlm_7b.py:{slice_name}: no preset for this slice "
                         f"(presets: {', '.join(PRESETS)}); tune one with benchmarks/aot_tune.py")
    remat, chunk, logits_chunk = PRESETS[slice_name]
    c = base.get_config()
    c.total_steps = 1253
    c.keep_checkpoints = 3
    c.log_every = 1
    c.checkpoint_every_minutes = 30.0
    c.init_from = "/path/to/Mistral-7B-v0.1"  # a Hugging Face directory or params checkpoint
    # Used only without init_from (and by ahead-of-time compilation): Mistral-7B-v0.1's shape.
    c.model.update(dict(family="mistral", vocab_size=32000, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        max_position_embeddings=32768, param_dtype="float32", dtype="bfloat16",
                        remat_policy=remat))
    c.data.update(dict(data_dir="/path/to/built_data", query_batch=2048, generative_batch=256,
                       group_size=2, num_threads=8))
    # A few padded shapes: one compiled step program per combination (6 here).
    c.data.buckets.update(dict(query="256", passage="512,1024,2048", generative="1024,2048"))
    # GradCache chunks are global and split over the data-parallel devices.
    c.loss.update(dict(grad_cache_chunk=chunk, logits_chunk=logits_chunk))
    return c
