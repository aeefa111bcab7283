"""grit_jax: Generative Representational Instruction Tuning (GRIT) in JAX/Flax."""

__version__ = "0.1.0"

from grit_jax.config import ModelConfig, RopeScaling  # noqa: E402


def __getattr__(name):
    # Heavier entry points load lazily so `import grit_jax` stays fast.
    if name == "GritLM":
        from grit_jax.inference import GritLM

        return GritLM
    if name == "Sampling":
        from grit_jax.generation import Sampling

        return Sampling
    raise AttributeError(name)


__all__ = ["GritLM", "ModelConfig", "RopeScaling", "Sampling", "__version__"]
