"""Where the train step's time goes: grit_jax (XLA:CPU op trace) next to the PyTorch reference
(torch.profiler), same weights and batch as benchmarks/train_step_speed.py.

One step of each side is traced after a warm-up; XLA's ops are grouped by kind from their names
in the compiled program (matmuls: ``dot`` and the XNNPACK/YNNPACK dot fusions; layout copies:
``copy``/``transpose`` fusions that materialise transposed operands; slicing: the layer scan's
dynamic slices and updates; fills: broadcasts of constants; the rest: elementwise and reduction
fusions). Op times overlap when XLA runs independent ops concurrently, so shares are of the
summed op time. PyTorch's are grouped from aten operator names the same way.

Prints one JSON object and writes benchmarks/results/profile_step.json.
Usage: python benchmarks/profile_step.py [--shape m57] [--top 15]
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import peers

KINDS = (  # (kind, pattern on an XLA op name / aten op name), first match wins
    ("matmul", r"^(ynn_fusion|xnn_fusion|onednn|dot|custom-call|"
               r"aten::(mm|bmm|addmm|matmul|linear))"),
    ("attention", r"^aten::_scaled_dot_product"),
    ("layout copies", r"copy|transpose"),
    ("scan slicing", r"dynamic-slice|dynamic-update-slice|aten::(slice|select|index|cat|stack)"),
    ("fills", r"broadcast|aten::(fill_|zero_|zeros)"),
    ("elementwise + reductions", r"."),
)


def kind(name):
    for k, pattern in KINDS:
        if re.search(pattern, name):
            return k
    return "other"


def summarise(times, top):
    total = sum(times.values())
    by_kind = collections.Counter()
    for name, t in times.items():
        by_kind[kind(name)] += t
    return {"op_seconds": round(total, 3),
            "by_kind": {k: {"seconds": round(t, 3), "share": round(t / total, 3)}
                        for k, t in by_kind.most_common()},
            "top_ops": [[n, round(t, 4)] for n, t in times.most_common(top)]}


def xla_op_times(step, batch, trace_dir):
    """Seconds per XLA op name over one traced step (thunks of the compiled program)."""
    import jax

    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    step(batch)
    jax.profiler.stop_trace()
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "::" in name or name.startswith("np."):
            continue  # Python frames and runtime bookkeeping, not ops
        times[name] += e["dur"] / 1e6
    return times


def torch_op_times(step, batch):
    """Self seconds per aten op over one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    times = collections.Counter()
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):
            times[ev.key] += ev.self_cpu_time_total / 1e6
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="m57", choices=sorted(peers.SHAPES))
    parser.add_argument("--lengths", default="64,128,256")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--name", default="profile_step")
    args = parser.parse_args(argv)

    q_len, p_len, g_len = (int(x) for x in args.lengths.split(","))
    batch = peers.grit_batch(4, 2, 4, q_len, p_len, g_len)
    kw = dict(lr=1e-5, total_steps=1000)
    with tempfile.TemporaryDirectory() as tmp:
        peers.save_model(tmp, args.shape)
        ref = peers.TorchGritStep(tmp, **kw)
        ref(batch)
        ref_times = torch_op_times(ref, batch)
        del ref
        ours = peers.JaxGritStep(tmp, batch=batch, **kw)
        ours(batch)
        our_times = xla_op_times(ours, batch, f"{tmp}/trace")
    result = {"machine": peers.machine(), "shape": args.shape,
              "batch": {"queries": 4, "passages": 8, "generative": 4,
                        "lengths": [q_len, p_len, g_len]},
              "grit_jax": summarise(our_times, args.top),
              "reference": summarise(ref_times, args.top)}
    return peers.write_result(args.name, result)


if __name__ == "__main__":
    main()
