"""The real GRIT train step compiled for a TPU topology, and its per-chip report.

Memory of the step and of setup against the chip's HBM; matmul FLOPs, HBM traffic and
collective bytes with every loop counted (``grit_jax.aot.cost``); the step time those imply on
the chip's roofline, and the MFU it implies.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from grit_jax import attention, hardware, sharding, trainer
from grit_jax.aot import cost as hlo_cost
from grit_jax.aot.libtpu import find_libtpu
from grit_jax.config import ModelConfig
from grit_jax.moe import resolve_impl
from grit_jax.train_step import init_state, jit_train_step

GIB = 2 ** 30
HEADROOM = 0.10  # a step "fits" a chip with at least this share of its HBM left over


def topology_devices(name: str, slices: int = 1):
    """The (abstract) devices of a TPU topology; a clear error without libtpu. Call before
    anything else initialises JAX's backends (libtpu is registered then)."""
    if find_libtpu() is None:
        raise ValueError("libtpu is not installed: make venv installs it into .venv/libtpu; "
                         "or pip install 'grit_jax[tpu]'; or set TPU_LIBRARY_PATH")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            num_slices=slices)
    except Exception as e:  # an unknown topology name
        raise ValueError(f"cannot describe TPU topology {name!r}: {e} (names look like "
                         f"v5p:4x4x4, v5e:16x16, v6e:8x8)") from e
    return list(topo.devices)


def abstract_batch(config, lengths, mesh):
    """ShapeDtypeStructs of one global batch, sharded as the trainer shards it."""
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
    if "gen" in rows:  # the cached-document tokens of context chats (gen_attention="context")
        batch["gen_context"] = jax.ShapeDtypeStruct(batch["gen_valid"].shape, jnp.bool_,
                                                    sharding=sh)
    return batch


def target_model(config, platform: str):
    """config.model (init_from only supplies values at run time) with ``auto`` kernels pinned
    for the target platform (the tracing host is a CPU)."""
    model_cfg = ModelConfig(**config.model.to_dict())
    if model_cfg.is_moe:
        model_cfg = model_cfg.replace(moe_impl=resolve_impl(model_cfg.moe_impl, platform))
    return model_cfg.replace(attention_impl=attention.for_platform(model_cfg.attention_impl,
                                                                   platform))


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"arguments": mem.argument_size_in_bytes / GIB,
            "outputs": mem.output_size_in_bytes / GIB,
            "aliased": mem.alias_size_in_bytes / GIB, "temporaries": mem.temp_size_in_bytes / GIB,
            "host_temporaries": getattr(mem, "host_temp_size_in_bytes", 0) / GIB,
            "total": total / GIB}


def _oom(e, base, devices):
    """A report for a program the TPU compiler refused as too large for HBM."""
    if "RESOURCE_EXHAUSTED" not in str(e):
        raise e
    message = str(e).splitlines()[0]
    found = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
    return dict(base, chips=None, devices=len(devices), device_kind=devices[0].device_kind,
                fits=False, compiler_error=message,
                needed_gib=float(found.group(1)) if found else None,
                hbm_gib=float(found.group(2)) if found else None)


_SETUP_MEMORY: dict[str, dict] = {}


def compile_setup(model_cfg, tx, mesh, state_sh) -> dict:
    """Per-device memory (GiB) of the setup programs: the sharded random init, and the
    optimizer-state init around weights restored into their shardings. Remembered per model
    shape and mesh: the step's knobs (remat, chunks) do not change them."""
    key = repr((dataclasses.replace(model_cfg, remat_policy="full"), dict(mesh.shape),
                [d.id for d in mesh.devices.flat], jax.tree.map(str, state_sh)))
    if key not in _SETUP_MEMORY:
        _SETUP_MEMORY[key] = _compile_setup(model_cfg, tx, mesh, state_sh)
    return dict(_SETUP_MEMORY[key])


def _compile_setup(model_cfg, tx, mesh, state_sh) -> dict:
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = trainer.abstract_state(model_cfg, tx, state_sh)["params"]
    out = {}
    with sharding.activate(mesh):
        init = trainer.init_program(model_cfg, tx, mesh, state_sh).lower(key).compile()
        out["random_init"] = _memory(init)["total"]
        opt = jax.jit(lambda p: init_state(p, tx), in_shardings=(state_sh["params"],),
                      out_shardings=state_sh, donate_argnums=(0,)).lower(params).compile()
        out["restore_and_opt_init"] = _memory(opt)["total"]
    return out


def compile_step(config, topology: str, lengths=(256, 2048, 2048), slices: int = 1):
    """Compile the train step (and setup) for the topology; returns (compiled, report dict)."""
    devices = topology_devices(topology, slices)
    mesh = trainer.mesh(config, devices)
    model_cfg = target_model(config, devices[0].platform)
    trainer.validate(config, mesh, model_cfg)
    lc = trainer.loss_config(config)
    tx, schedule = trainer.optimizer(config)
    state_sh = trainer.shardings(model_cfg, tx, mesh)
    state = trainer.abstract_state(model_cfg, tx, state_sh)
    batch = abstract_batch(config, lengths, mesh)
    step = jit_train_step(model_cfg, lc, tx, schedule, mesh, state_sh)
    base = {"topology": topology, "slices": slices, "mesh": dict(mesh.shape),
            "params": model_cfg.num_params(), "active_params": model_cfg.num_params(active=True),
            "dtype": model_cfg.dtype, "remat_policy": model_cfg.remat_policy,
            "attention_impl": model_cfg.attention_impl, "grad_cache_chunk": lc.grad_cache_chunk,
            "logits_chunk": lc.logits_chunk,
            "batch": {k: list(v.shape) for k, v in batch.items() if k.endswith("_ids")}}
    with sharding.activate(mesh):
        lowered = step.lower(state, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs beyond HBM
        return None, _oom(e, base, devices)

    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    kind = devices[0].device_kind
    # Some topologies list each TensorCore as a device (v4 without megacore): split the chip.
    chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}) \
        if hasattr(devices[0], "coords") else len(devices)
    per_chip = max(1, len(devices) // chips)
    chip = hardware.require_chip(kind)
    hbm, peak, hbm_bw, ici_bw = (x / per_chip for x in (chip.hbm_bytes, chip.peak_flops,
                                                         chip.hbm_bw, chip.ici_bw))
    dcn_bw = chip.dcn_bw / per_chip if chip.dcn_bw else None  # no published figure: no time
    memory = dict(_memory(compiled), hbm=hbm / GIB)
    setup = compile_setup(model_cfg, tx, mesh, state_sh)
    full = {k: np.ones(v.shape, bool) for k, v in batch.items() if k.endswith("_valid")}
    model_flops = trainer.step_flops(model_cfg, full, lc)
    n = len(devices)
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat] if slices > 1 else None
    cost = hlo_cost.analyze(compiled.as_text(), devices=n, peak_flops=peak, hbm_bw=hbm_bw,
                            ici_bw=ici_bw, dcn_bw=dcn_bw, slice_of=slice_of)
    dcn_s = cost["dcn_s"] or 0.0
    overlapped = max(cost["roofline_s"], cost["collective_s"], dcn_s)
    serial = cost["roofline_s"] + cost["collective_s"] + dcn_s
    param_bytes = sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                      for a in jax.tree.leaves(state["params"]))  # one device's shard
    report = {
        **base, "chips": chips, "devices": n, "device_kind": kind,
        "per_device_gib": memory, "setup_per_device_gib": setup,
        "headroom": 1 - memory["total"] / memory["hbm"],
        "fits": memory["total"] <= (1 - HEADROOM) * memory["hbm"]
                and max(setup.values()) <= memory["hbm"],
        "model_flops_per_step": model_flops,
        "peak_flops_per_device": peak, "hbm_bytes_per_s": hbm_bw, "ici_bytes_per_s": ici_bw,
        "dcn_bytes_per_s": dcn_bw,
        # Step time at 100% of peak on the model's FLOPs: a lower bound for any real step.
        "roofline_step_s": model_flops / n / peak,
        # The compiled program, loops counted by their trip counts (grit_jax.aot.cost).
        "hlo": {k: cost[k] for k in ("flops", "bytes", "collective_bytes", "dcn_bytes",
                                     "compute_s", "memory_s", "roofline_s", "collective_s",
                                     "dcn_s", "loops", "loop_trips", "unresolved_loops",
                                     "kernel_flops", "kernel_flops_by_source", "dcn_collectives")},
        "hlo_flops_over_model": cost["flops"] / (model_flops / n),
        # DCN bytes per device per step over its shard of the parameters: ~1 when the gradients
        # cross the slices once per step (a ring all-reduce over 2 slices sends the shard once).
        "dcn_bytes_over_params": cost["dcn_bytes"] / param_bytes if slices > 1 else None,
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
    if mesh["data"] > 1 and report.get("slices", 1) == 1:
        tips.append(f"move data parallelism into fsdp (mesh data={mesh['data']} -> 1, fsdp x "
                    f"{mesh['data']}): parameters and optimizer state shard further")
    if report["remat_policy"] != "full":
        tips.append(f"--config.model.remat_policy=full, or an offloading one (now "
                    f"{report['remat_policy']!r})")
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
                f"{r['params'] / 1e9:.2f}B params, remat {r['remat_policy']}, batch {r['batch']}"
                f"\nDOES NOT FIT: the TPU compiler says: {r['compiler_error']}")
    m, h, e, u = r["per_device_gib"], r["hlo"], r["estimated_step_s"], r["implied_mfu"]
    s = r["setup_per_device_gib"]
    verdict = ("fits" if r["fits"] else
               f"DOES NOT FIT (needs {HEADROOM:.0%} headroom)" if m["total"] <= m["hbm"]
               else "DOES NOT FIT")
    lines = [
        f"{r['topology']}" + (f" x {r['slices']} slices" if r.get("slices", 1) > 1 else "")
        + f": {r['chips']} chips ({r['devices']} devices) x {r['device_kind']}, "
        f"mesh {r['mesh']}, {r['params'] / 1e9:.2f}B params"
        + (f" ({r['active_params'] / 1e9:.2f}B active per token)"
           if r.get("active_params", r["params"]) != r["params"] else "")
        + f", {r['dtype']} compute, remat {r['remat_policy']}, attention {r['attention_impl']}, "
        f"GradCache chunk {r['grad_cache_chunk']}, LM-head chunk {r['logits_chunk']}",
        f"batch {r['batch']}",
        f"per device: arguments {m['arguments']:.2f} GiB, outputs {m['outputs']:.2f} GiB "
        f"(aliased {m['aliased']:.2f}), temporaries {m['temporaries']:.2f} GiB"
        + (f", host (offloaded) {m['host_temporaries']:.2f} GiB" if m["host_temporaries"] else "")
        + f"; total {m['total']:.2f} of {m['hbm']:.0f} GiB HBM ({r['headroom']:.0%} free) "
        f"-> {verdict}",
        f"setup per device: random init {s['random_init']:.2f} GiB, restore + optimizer init "
        f"{s['restore_and_opt_init']:.2f} GiB",
        f"compiled program per device (loops x trip counts): {h['flops']:.3e} matmul FLOPs "
        f"({r['hlo_flops_over_model']:.2f}x the model's "
        f"{r['model_flops_per_step'] / r['devices']:.3e}: "
        f"remat and GradCache or split_emb recompute), {h['bytes'] / 1e12:.2f} TB HBM traffic, "
        f"{h['collective_bytes'] / 1e9:.1f} GB sent over ICI"
        + (f", {h['dcn_bytes'] / 1e9:.2f} GB over DCN ({r['dcn_bytes_over_params']:.2f}x the "
           f"parameter shard)" if r.get("slices", 1) > 1 else "")
        + f"; {h['loops']} loops, trips {h['loop_trips']}"
        + ('' if not h['unresolved_loops']
           else f", {h['unresolved_loops']} unresolved (counted once)"),
        "kernels: " + (", ".join(f"{k} {v:.3e} FLOPs" for k, v in
                                 sorted(h["kernel_flops_by_source"].items())) or "none"),
        f"time per step: compute {h['compute_s']:.3g} s, HBM {h['memory_s']:.3g} s, "
        f"per-op roofline {h['roofline_s']:.3g} s, ICI collectives {h['collective_s']:.3g} s"
        + (f", DCN {h['dcn_s']:.3g} s" if r.get("slices", 1) > 1 and h["dcn_s"] is not None
           else ", DCN time unknown (no published DCN bandwidth)" if r.get("slices", 1) > 1
           else ""),
        f"estimated step time {e['overlapped']:.3g} s with collectives overlapped "
        f"({e['serial']:.3g} s without) -> implied MFU {100 * u['overlapped']:.1f}% "
        f"({100 * u['serial']:.1f}%) of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device",
        f"roofline: at 100% of peak the model's FLOPs take {r['roofline_step_s']:.3g} s",
    ]
    return "\n".join(lines)
