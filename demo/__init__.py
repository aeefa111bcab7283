"""``make demo`` (``python -m demo``) and its Wikipedia data: examples built on grit_jax, kept
outside the library."""

from grit_jax import cli


class NotInstalled(cli.UserError, FileNotFoundError):
    """A package the demo reads data from is missing: one line from the CLIs, and still a
    FileNotFoundError for callers that skip the part needing it."""
