"""Peak memory of the streaming HF <-> grit_jax conversion on a ~1B-parameter Mistral.

Writes a random Mistral checkpoint as sharded safetensors (tensor by tensor, numpy), then runs
both conversion commands in fresh processes and reports their peak RSS next to the model size.
Usage: python benchmarks/convert_memory.py [--workdir DIR] [--keep]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from grit_jax.config import ModelConfig
from grit_jax.convert import hf

CONFIG = ModelConfig(family="mistral", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_layers=16, num_heads=16, num_kv_heads=4, sliding_window=None)


def write_random_hf(directory: str, config: ModelConfig, shard_bytes: int = 2**30) -> int:
    """A random HF checkpoint written one tensor at a time; returns its size in bytes."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, cur, cur_bytes, total = [], {}, 0, 0
    weight_map = {}
    grit = hf._grit_shapes(config)

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(cur, os.path.join(directory, fname), metadata={"format": "pt"})
            shards.append(fname)
            for k in cur:
                weight_map[k] = fname
            cur, cur_bytes = {}, 0

    for name, path, index, _, _ in hf.hf_tensor_names(config):
        shape = hf._hf_shape(config, name, hf.slot_shape(grit[path], index))
        t = (0.02 * rng.standard_normal(shape, dtype=np.float32))
        if cur_bytes + t.nbytes > shard_bytes:
            flush()
        cur[name] = t
        cur_bytes += t.nbytes
        total += t.nbytes
    flush()
    with open(os.path.join(directory, hf.SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf.config_to_hf(config), f)
    return total


def run(cmd):
    out = subprocess.run([sys.executable, "-m", "grit_jax.convert", *cmd], check=True,
                         capture_output=True, text=True).stdout
    print(out.strip())
    return float(re.search(r"peak RSS ([\d.]+) GiB", out).group(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="grit_convert_mem_")
    try:
        size = write_random_hf(os.path.join(work, "hf"), CONFIG)
        gib = size / 2**30
        print(f"model: {CONFIG.num_params() / 1e9:.2f}B params, {gib:.2f} GiB float32")
        imp = run(["hf-to-grit", "--hf", os.path.join(work, "hf"), "--out",
                   os.path.join(work, "grit")])
        exp = run(["grit-to-hf", "--params", os.path.join(work, "grit"), "--out",
                   os.path.join(work, "back"), "--max-shard-gb", "1"])
        result = {"params_b": CONFIG.num_params() / 1e9, "model_gib": gib,
                  "hf_to_grit_peak_rss_gib": imp, "grit_to_hf_peak_rss_gib": exp,
                  "hf_to_grit_ratio": imp / gib, "grit_to_hf_ratio": exp / gib}
        print(json.dumps(result, indent=2))
        os.makedirs("benchmarks/results", exist_ok=True)
        with open("benchmarks/results/convert_memory.json", "w") as f:
            json.dump(result, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
