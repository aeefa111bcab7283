"""Mixture-of-experts kernels on CPU: the dropless grouped paths (tiled sort-and-segment, and
``jax.lax.ragged_dot``) against the dense all-experts reference, in one run on the same inputs.

One MoE layer of a scaled-down Mixtral (hidden 512, expert MLP 1792, 8 experts, top 2), float32,
routing from a random router; forward, and forward + backward (gradients for the tokens and all
expert weights). Medians of 5 after a warm-up; tokens/s and the ratio to the dense reference;
the outputs of every kernel are checked against the reference first.
Prints one JSON object and writes benchmarks/results/moe_kernels.json.
Usage: python benchmarks/moe_kernels.py
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds  # benchmarks/timing.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grit_jax import moe  # noqa: E402

HIDDEN, MLP, EXPERTS, TOP_K = 512, 1792, 8, 2


def inputs(tokens, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(tokens, HIDDEN)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(HIDDEN, EXPERTS)) / np.sqrt(HIDDEN), jnp.float32)
    _, top_w, top_i = moe.route(x, router, TOP_K)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32)
         for s in ((EXPERTS, HIDDEN, MLP), (EXPERTS, HIDDEN, MLP), (EXPERTS, MLP, HIDDEN))]
    return x, top_w, top_i, w


def main():
    out = {}
    for tokens in (512, 2048, 8192):
        x, top_w, top_i, w = inputs(tokens)
        row, ref = {}, None
        for name in ("dense", "tiled", "ragged"):
            kernel = moe.KERNELS[name]
            fwd = jax.jit(lambda x, tw, ti, *w, k=kernel: k(x, tw, ti, *w))
            grad = jax.jit(jax.grad(lambda x, tw, ti, *w, k=kernel: jnp.sum(k(x, tw, ti, *w) ** 2),
                                    argnums=(0, 3, 4, 5)))
            y = np.asarray(fwd(x, top_w, top_i, *w))
            ref = y if ref is None else ref
            f_s = median_seconds(lambda: fwd(x, top_w, top_i, *w).block_until_ready())
            g_s = median_seconds(lambda: jax.block_until_ready(grad(x, top_w, top_i, *w)))
            row[name] = {"forward_s": round(f_s, 5), "forward_backward_s": round(g_s, 5),
                         "forward_tokens_per_s": round(tokens / f_s),
                         "train_tokens_per_s": round(tokens / g_s),
                         "max_abs_diff_vs_dense": float(np.abs(y - ref).max())}
        for name in ("tiled", "ragged"):
            row[name]["forward_speedup_vs_dense"] = round(
                row["dense"]["forward_s"] / row[name]["forward_s"], 2)
            row[name]["train_speedup_vs_dense"] = round(
                row["dense"]["forward_backward_s"] / row[name]["forward_backward_s"], 2)
        out[str(tokens)] = row
        print(tokens, json.dumps(row), flush=True)
    result = {"benchmark": "moe_kernels", "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "cpus": os.cpu_count(), "layer": {"hidden": HIDDEN, "mlp": MLP, "experts": EXPERTS,
                                                "top_k": TOP_K, "dtype": "float32"},
              "results": out}
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.path.dirname(__file__), "results", "moe_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
