"""One attention layer on CPU: XLA's fused call, grit_jax's blocked kernel and PyTorch's SDPA.

Same inputs and masks on all three (float32, 8 query heads, 2 key/value heads, head_dim 32, the
RAG latency model's shapes, batch 1), forward and forward+backward (gradient of a weighted sum),
medians after a warm-up; outputs compared to the torch result.

Prints one JSON object and writes benchmarks/results/attention_cpu.json.
Usage: python benchmarks/attention_cpu.py [--lengths 512,1024,2048,4096]
"""

import argparse

import numpy as np

import peers
from timing import median_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--heads", default="8,2,32", help="query heads, key/value heads, head_dim")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="attention_cpu")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from grit_jax.attention import blocked_attention
    from grit_jax.model import attention_mask

    heads, kv_heads, d = (int(x) for x in args.heads.split(","))
    rng = np.random.default_rng(0)
    out = {}
    for t in (int(x) for x in args.lengths.split(",")):
        q = rng.normal(size=(1, t, heads, d)).astype(np.float32)
        k, v = (rng.normal(size=(1, t, kv_heads, d)).astype(np.float32) for _ in range(2))
        w = rng.normal(size=(1, t, heads, d)).astype(np.float32)
        pos = jnp.arange(t)[None]
        row = {}
        for mode in ("bidirectional", "causal"):
            mask = attention_mask(pos, pos, jnp.ones((1, t), bool), mode)
            kernels = {
                "xla": lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, mask=mask, scale=d ** -0.5),
                # causal: as the model calls it, each query block reads only visible keys
                "blocked": lambda q, k, v: blocked_attention(
                    q, k, v, mask, d ** -0.5, reach=1 if mode == "causal" else None),
            }
            qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v))
            tmask, tw = torch.from_numpy(np.asarray(mask)), torch.from_numpy(w).transpose(1, 2)

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, attn_mask=tmask, scale=d ** -0.5, enable_gqa=True)

            def sdpa_grad():
                qt.grad = kt.grad = vt.grad = None
                (sdpa() * tw).sum().backward()

            with torch.no_grad():
                want = sdpa().transpose(1, 2).numpy()
                torch_fwd = median_seconds(sdpa, args.repeats)
            cell = {"torch_sdpa_s": round(torch_fwd, 4),
                    "torch_sdpa_grad_s": round(median_seconds(sdpa_grad, args.repeats), 4)}
            qj, kj, vj, wj = map(jnp.asarray, (q, k, v, w))
            for name, fn in kernels.items():
                fwd = jax.jit(fn)
                grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * wj),
                                        argnums=(0, 1, 2)))
                fwd_s = median_seconds(lambda: fwd(qj, kj, vj).block_until_ready(), args.repeats)
                grad_s = median_seconds(lambda: jax.block_until_ready(grad(qj, kj, vj)),
                                        args.repeats)
                cell[f"{name}_s"] = round(fwd_s, 4)
                cell[f"{name}_grad_s"] = round(grad_s, 4)
                cell[f"{name}_over_torch"] = round(fwd_s / torch_fwd, 2)
                cell[f"{name}_grad_over_torch"] = round(grad_s / cell["torch_sdpa_grad_s"], 2)
                cell[f"{name}_max_abs_diff"] = float(
                    np.abs(np.asarray(fwd(qj, kj, vj)) - want).max())
            row[mode] = cell
        out[str(t)] = row
    return peers.write_result(args.name, {"machine": peers.machine(),
                                          "heads": [heads, kv_heads, d], "results": out})


if __name__ == "__main__":
    main()
