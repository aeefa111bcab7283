"""Ahead-of-time compilation of the real GRIT train step for a TPU topology, from a CPU box.

    python -m grit_jax.aot --config configs/gritlm_7b.py --topology v5p:4x4x4 [--slices 2]
        [--json out.json] [--config.model.remat_policy=minimal ...]

libtpu (installed by ``make venv`` into .venv/libtpu and found there, or ``pip install
'grit_jax[tpu]'``, or any libtpu.so named by ``TPU_LIBRARY_PATH``) describes the topology's
chips without any TPU; the train step (GradCache, mixed LM loss, optimizer, donation: exactly
what ``grit_jax.train`` runs, with the target's kernels: splash attention, megablox experts) is
lowered with abstract, sharded inputs on the config's mesh and compiled by the TPU compiler, and
so are the setup programs (the sharded random init, and the optimizer-state init around
restored weights). Reported per chip: memory of the step and of setup against the chip's HBM
(and the headroom left); the compiled program's matmul FLOPs, HBM traffic and collective bytes
with every loop counted by its trip count (``grit_jax.aot.cost``), split into ICI and
cross-slice (DCN) traffic; the step time those imply on the chip's roofline, and the MFU it
implies. Exits 1 with advice when the step does not fit; 2 on a bad config or topology.
"""

from grit_jax.aot.libtpu import allow_concurrent_compiles, find_libtpu

find_libtpu()  # before jax loads its backends
allow_concurrent_compiles()

from grit_jax.aot.estimate import (GIB, HEADROOM, abstract_batch, advice, compile_setup,
                                   compile_step, format_report, target_model, topology_devices)

__all__ = ["GIB", "HEADROOM", "abstract_batch", "advice", "compile_setup", "compile_step",
           "find_libtpu", "format_report", "target_model", "topology_devices"]
