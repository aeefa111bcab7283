"""GritLM-7B recipe with LoRA on one TPU host (v5e-8 or v6e-8): Mistral-7B frozen, rank-16
adapters on every attention and MLP projection, only the adapters in Adam.

The frozen base is held in nf4 (QLoRA's 4-bit NormalFloat, a float32 scale per 64 inputs and
output channel; model.base_quant, quantized as the float checkpoint is read; int8 trades memory
for speed, see the README), the embedding table and LM head in bfloat16;
adapters are bfloat16 too (model.param_dtype; float32 adapters would also make the unquantized
tables float32). The paper's batch of 2048 queries x 2
passages + 256 generative samples per step runs through GradCache chunks of 64 sequences and
full remat; the per-chip memory of the compiled step is in the README (LoRA section), measured
with:

python -m grit_jax.aot --config configs/gritlm_7b_lora.py:v5e-8 --topology v5e:2x4
python -m grit_jax.aot --config configs/gritlm_7b_lora.py:v6e-8 --topology v6e:2x4
python -m grit_jax.train --config configs/gritlm_7b_lora.py:v5e-8 --workdir gs://BUCKET/lora7b \\
    --config.init_from=/path/to/Mistral-7B-v0.1 --config.data.data_dir=gs://BUCKET/data
"""

from configs import gritlm_7b

# Slice -> (remat_policy, grad_cache_chunk, logits_chunk), checked by ahead-of-time compilation.
PRESETS = {
    "v5e-8": ("full", 64, 1024),
    "v6e-8": ("full", 64, 1024),  # 61% of HBM free: room for less remat, not tuned yet
}


def get_config(slice_name: str = "v5e-8"):
    if slice_name not in PRESETS:
        raise ValueError(f"configs/gritlm_7b_lora.py:{slice_name}: no preset for this slice "
                         f"(presets: {', '.join(PRESETS)})")
    remat, chunk, logits_chunk = PRESETS[slice_name]
    c = gritlm_7b.get_config("v5p-128")
    c.model.update(dict(param_dtype="bfloat16", remat_policy=remat, lora_rank=16,
                        lora_alpha=32.0, lora_dropout=0.05,
                        lora_targets="q,k,v,o,gate,up,down", base_quant="nf4", quant_block=64))
    # The 256 x 2048-token generative batch in 8 passes of 32 (the same result, see
    # loss.gen_micro_batches): one pass of all of them needs 2.5x the HBM of a v5e chip.
    c.loss.update(dict(grad_cache_chunk=chunk, logits_chunk=logits_chunk, gen_micro_batches=8))
    c.optim.update(dict(lr=2e-4))  # adapters take a larger step than full finetuning
    return c
