"""``make demo`` (``python -m demo``) and its Wikipedia data: examples built on grit_jax, kept
outside the library."""
