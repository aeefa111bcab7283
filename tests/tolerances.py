"""Comparison bounds that hold on any machine.

Results that should be equal up to the order of floating-point reductions (a different mesh,
process count, chunking or device layout) are compared in float64 (JAX_ENABLE_X64 in a
subprocess, or ``jax.enable_x64(True)`` in-process; the model then computes norms, RoPE,
attention, pooling, logits and losses in float64). Reordering a sum of n terms moves it by at
most about n * 2^-53 relative; the bound below leaves a factor of about 10^6 over that for the
amplification by the contrastive temperature (1/0.02), softmaxes and a few Adam steps, and stays
eight orders of magnitude below a float32 difference, so a real mistake (a wrong shard, a
dropped row, a float32 intermediate) still fails it.
"""

FLOAT64_RTOL = 1e-9
FLOAT64_ATOL = 1e-12


def close64(a: float, b: float) -> bool:
    """a equals b up to float64 reordering (see the module docstring)."""
    return abs(a - b) <= FLOAT64_ATOL + FLOAT64_RTOL * abs(b)
