"""Compiled peak temporary memory of the embedding gradient: plain vs GradCache vs split_emb.

XLA's memory analysis of the compiled step (no run needed), for a growing embedding batch.
Usage: python benchmarks/gradcache_memory.py
"""

import json
import os
from functools import partial

import jax
import numpy as np

from grit_jax.config import tiny_config
from grit_jax.model import abstract_params
from grit_jax.train_step import LossConfig, loss_and_grads

CFG = tiny_config(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                  num_kv_heads=4)


def temp_bytes(lc, queries, length=128, group=2):
    import flax.linen as nn

    params = nn.unbox(abstract_params(CFG))
    sds = jax.ShapeDtypeStruct

    def rows(n):
        return (sds((n, length), np.int32), sds((n, length), bool), sds((n, length), np.int32))

    b = {}
    b["query_ids"], b["query_valid"], b["query_pool"] = rows(queries)
    b["passage_ids"], b["passage_valid"], b["passage_pool"] = rows(queries * group)
    fn = jax.jit(partial(loss_and_grads, config=CFG, lc=lc))
    return fn.lower(params, batch=b).compile().memory_analysis().temp_size_in_bytes


def main():
    result = {}
    for q in (16, 32, 64):
        row = {"plain": temp_bytes(LossConfig(mode="embedding"), q),
               "split_emb": temp_bytes(LossConfig(mode="embedding", split_emb=True), q),
               "grad_cache_8": temp_bytes(LossConfig(mode="embedding", grad_cache_chunk=8), q)}
        result[q] = {k: round(v / 2**20, 1) for k, v in row.items()}
        print(f"{q} queries x 2 passages x 128 tokens: temp MiB {result[q]}", flush=True)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/gradcache_memory.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
