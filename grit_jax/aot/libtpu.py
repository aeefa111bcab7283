"""libtpu for compiling from a machine without TPUs: found before JAX starts its backends."""

from __future__ import annotations

import importlib.util
import os
import sys

from grit_jax import hardware  # no JAX import: safe before the backends start


def find_libtpu() -> str | None:
    """libtpu for compiling: TPU_LIBRARY_PATH, the ``libtpu`` package, or the copy ``make venv``
    puts beside this environment (.venv/libtpu, outside site-packages so that ordinary JAX
    processes never probe for a TPU). Sets TPU_LIBRARY_PATH for the last; None if none."""
    if os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
        return os.environ.get("TPU_LIBRARY_PATH", "libtpu package")
    local = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if os.path.exists(local):
        os.environ["TPU_LIBRARY_PATH"] = local
        return local
    return None


def allow_concurrent_compiles() -> None:
    """Off a TPU VM libtpu only compiles: let several such processes (a tuning sweep and the
    tests) load it at once instead of failing on its lockfile, which guards real chips."""
    if not hardware.on_tpu_vm():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
