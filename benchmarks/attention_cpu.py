"""Why long sequences are slow on CPU: one attention layer, XLA (jax.nn.dot_product_attention) vs
PyTorch's fused scaled_dot_product_attention, same shapes, float32, medians of 5 after a warm-up.

Shapes of the RAG latency model (8 query heads, 2 key/value heads, head_dim 32), batch 1.
Prints one JSON object and writes benchmarks/results/attention_cpu.json.
Usage: python benchmarks/attention_cpu.py
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds  # benchmarks/timing.py


def main():
    import torch

    heads, kv_heads, d = 8, 2, 32
    rng = np.random.default_rng(0)
    out = {}
    for t in (512, 1024, 2048, 4096):
        q = rng.normal(size=(1, t, heads, d)).astype(np.float32)
        k = rng.normal(size=(1, t, kv_heads, d)).astype(np.float32)
        v = rng.normal(size=(1, t, kv_heads, d)).astype(np.float32)
        row = {}
        for causal in (False, True):
            f = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c))
            qj, kj, vj = map(jnp.asarray, (q, k, v))
            xla = median_seconds(lambda: f(qj, kj, vj).block_until_ready())
            qt = torch.from_numpy(q).transpose(1, 2)
            kt = torch.from_numpy(np.repeat(k, heads // kv_heads, 2)).transpose(1, 2)
            vt = torch.from_numpy(np.repeat(v, heads // kv_heads, 2)).transpose(1, 2)
            with torch.no_grad():
                ref = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal))
                diff = np.abs(np.asarray(f(qj, kj, vj)) - torch.nn.functional.
                              scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                              .transpose(1, 2).numpy()).max()
            row["causal" if causal else "bidirectional"] = {
                "xla_s": round(xla, 4), "torch_sdpa_s": round(ref, 4),
                "xla_over_torch": round(xla / ref, 1), "max_abs_diff": float(diff)}
        out[str(t)] = row
    result = {"benchmark": "attention_cpu", "date": time.strftime("%Y-%m-%d"),
              "jax": jax.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
              "results": out}
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.path.dirname(__file__), "results", "attention_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
