"""Ahead-of-time compilation of the real GRIT train step for a TPU topology, from a CPU box.

    python -m grit_jax.aot --config configs/gritlm_7b.py --topology v5p:4x4x4 [--json out.json]

libtpu (``pip install 'grit_jax[tpu]'``, or any libtpu.so named by ``TPU_LIBRARY_PATH``)
describes the topology's chips without any TPU (one process at a time: libtpu locks); the
train step (GradCache, mixed LM loss, optimizer, donation: exactly what ``grit_jax.train`` runs)
is lowered with abstract, sharded inputs on the config's mesh and compiled by the TPU compiler.
Reported per chip: argument, output, temporary and total memory against the chip's HBM; the
compiled program's matmul FLOPs, HBM traffic and collective bytes with every loop counted by its
trip count (``grit_jax.hlo_cost``; XLA's own cost analysis counts a loop body once); the step
time those imply on the chip's roofline, and the model-FLOPs utilisation it implies. Exits 1 with
advice when the step does not fit; 2 on a bad config or topology.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from grit_jax import attention, hardware, hlo_cost, train  # train defines --config (the same config files as training)

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v4:4x4x4, v5e:4x4, v6e:4x4")
flags.DEFINE_string("lengths", "256,2048,2048",
                    "query, passage and generative sequence lengths of the compiled step")
flags.DEFINE_string("json", None, "also write the report to this file")

GIB = 2 ** 30


def topology_devices(name: str):
    """The (abstract) devices of a TPU topology; a clear error without libtpu."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing, or an unknown topology name
        raise ValueError(f"cannot describe TPU topology {name!r}: {e} (install libtpu with "
                         f"pip install 'grit_jax[tpu]'; names look like v5p:4x4x4)") from e
    return list(topo.devices)


def abstract_batch(config, lengths, mesh):
    """ShapeDtypeStructs of one global batch, sharded as the trainer shards it."""
    from grit_jax import sharding

    q_len, p_len, g_len = lengths
    sh = sharding.batch_sharding(mesh)
    mode = config.loss.mode
    rows = {}
    if mode != "generative":
        n = int(config.data.query_batch)
        rows["query"] = (n, q_len, "pool")
        rows["passage"] = (n * int(config.data.group_size), p_len, "pool")
    if mode != "embedding":
        rows["gen"] = (int(config.data.generative_batch), g_len, "loss")
    batch = {}
    for prefix, (n, t, mask) in rows.items():
        batch[f"{prefix}_ids"] = jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=sh)
        batch[f"{prefix}_valid"] = jax.ShapeDtypeStruct((n, t), jnp.bool_, sharding=sh)
        batch[f"{prefix}_{mask}"] = jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=sh)
    return batch


def compile_step(config, topology: str, lengths=(256, 2048, 2048)):
    """Compile the train step for the topology; returns (compiled, report dict)."""
    from grit_jax import sharding
    from grit_jax.config import ModelConfig
    from grit_jax.model import abstract_params
    from grit_jax.train_step import (LossConfig, init_state, jit_train_step, make_optimizer,
                                     state_shardings)

    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    train.validate(config, mesh)
    model_cfg = ModelConfig(**config.model.to_dict())  # init_from only supplies values
    if model_cfg.is_moe:  # the kernel for the target chips, not for this host
        from grit_jax.moe import resolve_impl

        model_cfg = model_cfg.replace(moe_impl=resolve_impl(model_cfg.moe_impl, devices[0].platform))
    # Traced on this CPU host for TPUs: pin the attention kernel for the target, not the host.
    model_cfg = model_cfg.replace(
        attention_impl=attention.for_platform(model_cfg.attention_impl, devices[0].platform))
    lc = LossConfig(**config.loss.to_dict())
    tx, schedule = make_optimizer(config.optim.lr, config.total_steps, config.optim.warmup_ratio,
                                  config.optim.weight_decay, config.optim.b1, config.optim.b2,
                                  clip_norm=config.optim.clip_norm)
    state_sh = state_shardings(model_cfg, tx, mesh)
    import flax.linen as nn

    params = nn.unbox(abstract_params(model_cfg))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(lambda p: init_state(p, tx), params), state_sh)
    batch = abstract_batch(config, lengths, mesh)
    step = jit_train_step(model_cfg, lc, tx, schedule, mesh, state_sh)
    base = {"topology": topology, "mesh": dict(mesh.shape), "params": model_cfg.num_params(),
            "active_params": model_cfg.num_params(active=True),
            "dtype": model_cfg.dtype, "remat_policy": model_cfg.remat_policy,
            "grad_cache_chunk": lc.grad_cache_chunk,
            "batch": {k: list(v.shape) for k, v in batch.items() if k.endswith("_ids")}}
    with sharding.activate(mesh):
        lowered = step.jitted.lower(state, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs beyond HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).splitlines()[0]
        found = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
        return None, dict(base, chips=None, devices=len(devices),
                          device_kind=devices[0].device_kind, fits=False, compiler_error=message,
                          needed_gib=float(found.group(1)) if found else None,
                          hbm_gib=float(found.group(2)) if found else None)

    mem = compiled.memory_analysis()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    kind = devices[0].device_kind
    # Some topologies list each TensorCore as a device (v4 without megacore): split the chip.
    chips = len({tuple(d.coords) for d in devices}) if hasattr(devices[0], "coords") else len(devices)
    per_chip = max(1, len(devices) // chips)
    spec = hardware.require_chip(kind)
    hbm, peak, hbm_bw, ici_bw = (x / per_chip for x in (spec.hbm_bytes, spec.peak_flops,
                                                         spec.hbm_bw, spec.ici_bw))
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    full = {k: np.ones(v.shape, bool) for k, v in batch.items() if k.endswith("_valid")}
    model_flops = train.step_flops(model_cfg, full)
    n = len(devices)
    cost = hlo_cost.analyze(compiled.as_text(), devices=n, peak_flops=peak, hbm_bw=hbm_bw,
                            ici_bw=ici_bw)
    overlapped = max(cost["roofline_s"], cost["collective_s"])
    serial = cost["roofline_s"] + cost["collective_s"]
    report = {
        **base, "chips": chips, "devices": n, "device_kind": kind,
        "per_device_gib": {"arguments": mem.argument_size_in_bytes / GIB,
                           "outputs": mem.output_size_in_bytes / GIB,
                           "aliased": mem.alias_size_in_bytes / GIB,
                           "temporaries": mem.temp_size_in_bytes / GIB,
                           "total": total / GIB, "hbm": hbm / GIB},
        "fits": total <= hbm,
        "model_flops_per_step": model_flops,
        "peak_flops_per_device": peak, "hbm_bytes_per_s": hbm_bw, "ici_bytes_per_s": ici_bw,
        # Step time at 100% of peak on the model's FLOPs: a lower bound for any real step.
        "roofline_step_s": model_flops / n / peak,
        # The compiled program, loops counted by their trip counts (grit_jax.hlo_cost).
        "hlo": {k: cost[k] for k in ("flops", "bytes", "collective_bytes", "compute_s",
                                     "memory_s", "roofline_s", "collective_s", "loops",
                                     "loop_trips", "unresolved_loops", "kernel_flops")},
        "hlo_flops_over_model": cost["flops"] / (model_flops / n),
        "estimated_step_s": {"overlapped": overlapped, "serial": serial},
        "implied_mfu": {"overlapped": model_flops / n / overlapped / peak,
                        "serial": model_flops / n / serial / peak},
        # XLA's own cost analysis counts each while-loop body once: kept for reference only.
        "xla_cost_analysis": {"flops": float(xla.get("flops", 0.0)),
                              "optimal_seconds": float(xla.get("optimal_seconds", 0.0))},
    }
    return compiled, report


def advice(report, config) -> list[str]:
    """Knobs that lower per-chip memory, for a step that does not fit."""
    tips = []
    mesh = report["mesh"]
    if mesh["data"] > 1:
        tips.append(f"move data parallelism into fsdp (mesh data={mesh['data']} -> 1, fsdp x "
                    f"{mesh['data']}): parameters and optimizer state shard further")
    if report["remat_policy"] != "full":
        tips.append(f"--config.model.remat_policy=full (now {report['remat_policy']!r})")
    chunk = report["grad_cache_chunk"]
    if config.loss.mode != "generative":
        tips.append(f"a smaller --config.loss.grad_cache_chunk (now {chunk or 'off'}: "
                    f"{'turn GradCache on' if not chunk else 'halve it'})")
    tips.append("fewer sequences per step (--config.data.query_batch / generative_batch) or "
                "shorter --lengths; a larger topology")
    if mesh["tensor"] == 1:
        tips.append("tensor parallelism (mesh tensor=2..8) shards activations of the MLP and heads")
    return tips


def format_report(r) -> str:
    if "compiler_error" in r:
        return (f"{r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, "
                f"{r['params'] / 1e9:.2f}B params, batch {r['batch']}\nDOES NOT FIT: the TPU "
                f"compiler says: {r['compiler_error']}")
    m, h, e, u = r["per_device_gib"], r["hlo"], r["estimated_step_s"], r["implied_mfu"]
    lines = [
        f"{r['topology']}: {r['chips']} chips ({r['devices']} devices) x {r['device_kind']}, "
        f"mesh {r['mesh']}, "
        f"{r['params'] / 1e9:.2f}B params"
        + (f" ({r['active_params'] / 1e9:.2f}B active per token)"
           if r.get("active_params", r["params"]) != r["params"] else "")
        + f", {r['dtype']} compute, remat {r['remat_policy']}, "
        f"GradCache chunk {r['grad_cache_chunk']}",
        f"batch {r['batch']}",
        f"per device: arguments {m['arguments']:.2f} GiB, outputs {m['outputs']:.2f} GiB "
        f"(aliased {m['aliased']:.2f}), temporaries {m['temporaries']:.2f} GiB; total "
        f"{m['total']:.2f} of {m['hbm']:.0f} GiB HBM -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"compiled program per device (loops x trip counts): {h['flops']:.3e} matmul FLOPs "
        f"({r['hlo_flops_over_model']:.2f}x the model's {r['model_flops_per_step'] / r['devices']:.3e}: "
        f"remat and GradCache or split_emb recompute), {h['bytes'] / 1e12:.2f} TB HBM traffic, "
        f"{h['collective_bytes'] / 1e9:.1f} GB sent over ICI; {h['loops']} loops, trips "
        f"{h['loop_trips']}{'' if not h['unresolved_loops'] else ', %d unresolved (counted once)' % h['unresolved_loops']}",
        f"time per step: compute {h['compute_s']:.3g} s, HBM {h['memory_s']:.3g} s, per-op roofline "
        f"{h['roofline_s']:.3g} s, collectives {h['collective_s']:.3g} s",
        f"estimated step time {e['overlapped']:.3g} s with collectives overlapped "
        f"({e['serial']:.3g} s without) -> implied MFU {100 * u['overlapped']:.1f}% "
        f"({100 * u['serial']:.1f}%) of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device",
        f"roofline: at 100% of peak the model's FLOPs take {r['roofline_step_s']:.3g} s",
    ]
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    if FLAGS.config is None or FLAGS.topology is None:
        print("error: --config and --topology are required", file=sys.stderr)
        return 2
    try:
        lengths = tuple(int(x) for x in FLAGS.lengths.split(","))
        if len(lengths) != 3 or min(lengths) <= 0:
            raise ValueError(f"--lengths={FLAGS.lengths!r}: three positive integers expected")
        _, report = compile_step(FLAGS.config, FLAGS.topology, lengths)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    if not report["fits"]:
        print("does not fit; knobs that help:\n  - " + "\n  - ".join(advice(report, FLAGS.config)))
        return 1
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
