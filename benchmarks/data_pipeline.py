"""Throughput of the data pipeline on the Wikipedia demo set, replicated to a useful size.

Build: JSONL -> validated, tokenised TFDS array_record (records/s, tokens/s).
Read: step-indexed grain batches (examples/s, tokens/s), median of repeats.
Usage: python benchmarks/data_pipeline.py [--copies 20] [--steps 50]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo/

from demo import wikipedia  # noqa: E402
from grit_jax.data.dataset import build  # noqa: E402
from grit_jax.data.pipeline import GritBatches, PipelineConfig  # noqa: E402
from grit_jax.data.records import write_jsonl  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=20, help="replicas of the demo JSONL")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="grit_data_bench_")
    try:
        files = wikipedia.make_records(wikipedia.articles())
        files = {k: v * args.copies for k, v in files.items()}
        write_jsonl(os.path.join(work, "jsonl"), files)
        n_records = sum(len(v) for v in files.values())
        t0 = time.perf_counter()
        builder = build(os.path.join(work, "jsonl"), os.path.join(work, "data"),
                        max_lengths={"query": 256, "passage": 512, "generative": 512})
        build_s = time.perf_counter() - t0
        tokens = sum(d["tokens"] for d in builder.info.metadata["datasets"].values())
        result = {"records": n_records, "build_s": build_s,
                  "build_records_per_s": n_records / build_s,
                  "build_tokens_per_s": tokens / build_s}
        for threads in (0, 4):
            cfg = PipelineConfig(os.path.join(work, "data"), query_batch=32, generative_batch=32,
                                 group_size=2, num_threads=threads, num_epochs=50)
            rates = []
            for r in range(args.repeats):
                it = GritBatches(cfg).iterator()
                next(it)  # start-up (plan, first read) excluded
                t0, ex, tok = time.perf_counter(), 0, 0
                for _ in range(args.steps):
                    b = next(it)
                    # q + 2 passages + gen
                    ex += b["query_ids"].shape[0] * 3 + b["gen_ids"].shape[0]
                    tok += int(b["query_valid"].sum() + b["passage_valid"].sum()
                               + b["gen_valid"].sum())
                dt = time.perf_counter() - t0
                rates.append((args.steps / dt, ex / dt, tok / dt))
            med = [statistics.median(x) for x in zip(*rates)]
            result[f"read_threads{threads}"] = {"steps_per_s": med[0], "sequences_per_s": med[1],
                                                "tokens_per_s": med[2]}
        print(json.dumps(result, indent=2))
        os.makedirs("benchmarks/results", exist_ok=True)
        with open("benchmarks/results/data_pipeline.json", "w") as f:
            json.dump(result, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
