"""Model configuration: one frozen dataclass for the Mistral/Llama/Mixtral decoder family."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp

from grit_jax import storage

FAMILIES = ("mistral", "llama", "mixtral")  # mixtral: the MLP is a routed mixture of experts
MOE_IMPLS = ("auto", "tiled", "ragged", "megablox", "dense")  # see grit_jax.moe
ATTENTION_IMPLS = ("auto", "xla", "blocked", "splash", "splash_interpret")  # see grit_jax.attention
# see grit_jax.model.REMAT: full saves nothing; minimal every matmul output; offloaded: to host
REMAT_POLICIES = ("none", "full", "save_qkv_proj", "save_dot_except_mlp",
                  "save_dot_except_mlpwi", "minimal", "minimal_with_context", "qkv_proj_offloaded",
                  "minimal_offloaded", "dots", "dots_no_batch")
BASE_QUANTS = ("none", "int8", "int4", "nf4")  # the frozen base under LoRA (grit_jax.quant)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # projections LoRA can adapt
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: JAX_ENABLE_X64=1 (parity checks)
CONFIG_FILE = "grit_config.json"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type='llama3'``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape, numerics and execution knobs of a decoder; hashable so Flax can hold it."""

    family: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # causal mode only; see attention_mask()
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat_policy: str = "none"
    # auto: blocked on CPU, splash on TPU, XLA elsewhere (attention.py)
    attention_impl: str = "auto"
    # Layers per iteration of the layer scan: 1 keeps one loop body (fast compiles, TPU pods);
    # 0 or >= num_layers unrolls it into straight-line code (on XLA:CPU measured no faster: the
    # per-layer weight slices are copied either way; see README, Performance).
    scan_unroll: int = 1
    # Mixture of experts (family="mixtral" only): experts per layer, experts each token uses,
    # the load-balancing loss coefficient (transformers' router_aux_loss_coef) and the kernel.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    moe_impl: str = "auto"
    # >0: a learned linear map (with bias) of the pooled embedding to this many dimensions
    # (GritLM's ``projection``; the released models have none). See grit_jax.embedding.
    projection_dim: int = 0
    # LoRA (grit_jax.lora): rank > 0 adds low-rank adapters (alpha / rank) * dropout(x) A B to
    # the listed projections; only adapters (and a projection head) are then trained.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o"  # comma-separated, from LORA_TARGETS
    # QLoRA-style storage of the frozen base's projections (grit_jax.quant): "int8" (a scale per
    # output channel), "int4" or "nf4" (a scale per quant_block inputs and output channel).
    base_quant: str = "none"
    quant_block: int = 64

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r} (expected one of {FAMILIES})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} (must be > 0)")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of "
                            f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                            f"{self.num_heads}; set head_dim explicitly")
        if self.resolved_head_dim % 2:
            problems.append(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window={self.sliding_window} (must be > 0 or None)")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} (expected one of {DTYPES})")
            elif getattr(self, name) == "float64" and not jax.config.jax_enable_x64:
                problems.append(f"{name}='float64' needs 64-bit JAX (JAX_ENABLE_X64=1); "
                                f"without it arrays would silently be float32")
        if self.family == "mixtral":
            if self.num_experts <= 0:
                problems.append(f"num_experts={self.num_experts} (a mixtral model needs >= 1)")
            elif not 1 <= self.num_experts_per_tok <= self.num_experts:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                f"[1, num_experts={self.num_experts}]")
            if self.router_aux_loss_coef < 0:
                problems.append(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")
            if self.moe_impl not in MOE_IMPLS:
                problems.append(f"moe_impl={self.moe_impl!r} (expected one of {MOE_IMPLS})")
        elif self.num_experts:
            problems.append(f"num_experts={self.num_experts} with family={self.family!r} "
                            f"(experts need family='mixtral')")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r} (expected one of "
                            f"{ATTENTION_IMPLS})")
        if self.lora_rank < 0:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0 (0: no adapters)")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        bad = sorted(self.lora_target_set - set(LORA_TARGETS))
        if bad or (self.lora_rank and not self.lora_target_set):
            problems.append(f"lora_targets={self.lora_targets!r}: expected a comma-separated "
                            f"subset of {LORA_TARGETS}")
        if self.lora_rank and self.family == "mixtral" and self.lora_target_set & {"gate", "up",
                                                                                   "down"}:
            problems.append("lora_targets: a mixture of experts' MLP projections cannot take "
                            "adapters here; adapt the attention (q, k, v, o)")
        if self.base_quant not in BASE_QUANTS:
            problems.append(f"base_quant={self.base_quant!r} (expected one of {BASE_QUANTS})")
        elif self.base_quant != "none" and (not self.lora_rank or self.family == "mixtral"):
            problems.append(f"base_quant={self.base_quant!r} holds a frozen base: it needs "
                            f"lora_rank > 0 and a dense model (family mistral or llama)")
        elif self.base_quant in ("int4", "nf4"):
            if self.quant_block <= 0:
                problems.append(f"quant_block={self.quant_block} must be > 0")
            else:
                for name, size in (("hidden_size", self.hidden_size), ("intermediate_size",
                                   self.intermediate_size), ("head_dim", self.resolved_head_dim)):
                    if size % min(self.quant_block, size):
                        problems.append(f"base_quant={self.base_quant!r}: {name}={size} is not "
                                        f"a multiple of quant_block={self.quant_block}")
        if self.projection_dim < 0:
            problems.append(f"projection_dim={self.projection_dim} must be >= 0 (0: no head)")
        if self.scan_unroll < 0:
            problems.append(f"scan_unroll={self.scan_unroll} must be >= 0 (0: fully unrolled)")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r} "
                            f"(expected one of {REMAT_POLICIES})")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: explicit ``head_dim`` or ``hidden_size // num_heads``."""
        return (self.head_dim if self.head_dim is not None
                else self.hidden_size // max(self.num_heads, 1))

    @property
    def lora_target_set(self) -> frozenset:
        """The projections LoRA adapts (empty without adapters)."""
        if not self.lora_rank:
            return frozenset()
        return frozenset(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def embedding_dim(self) -> int:
        """Width of the model's embeddings: the projection head's, or the hidden size."""
        return self.projection_dim or self.hidden_size

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def accum_dtype(self):
        """Dtype of norms, RoPE tables and logits: float32, or float64 for a float64 model."""
        return jnp.dtype("float64" if self.dtype == "float64" else "float32")

    def replace(self, **kw) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **kw)

    @property
    def is_moe(self) -> bool:
        return self.family == "mixtral"

    def layer_matmul_params(self, active: bool = False) -> int:
        """Matmul weights of one layer (attention, MLP or experts + router); ``active``: only
        the experts a token uses."""
        e, m, d = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * e * m
        if self.is_moe:
            used = self.num_experts_per_tok if active else self.num_experts
            mlp = used * mlp + e * self.num_experts  # experts + router
        return attn + mlp

    def training_flops(self, length: int, *, causal: bool, lm_head: bool) -> float:
        """Model FLOPs to train on one sequence (forward + backward, nothing recomputed): 6 x the
        matmul weights a token uses x length, attention scores and values 12 x layers x heads x
        head_dim x the (query, key) pairs (length^2, or length (length + 1) / 2 when causal),
        and for generative sequences the LM head (6 x hidden x vocab x length)."""
        pairs = length * (length + 1) / 2 if causal else float(length) ** 2
        body = 6.0 * self.num_layers * self.layer_matmul_params(active=True) * length
        attn = 12.0 * self.num_layers * self.num_heads * self.resolved_head_dim * pairs
        head = 6.0 * self.hidden_size * self.vocab_size * length if lm_head else 0.0
        return body + attn + head

    def num_params(self, active: bool = False) -> int:
        """Parameter count from the shapes alone; ``active``: only the experts a token uses."""
        e = self.hidden_size
        per_layer = self.layer_matmul_params(active) + 2 * e  # + the two norms
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        projection = (e + 1) * self.projection_dim
        return (self.vocab_size * e + self.num_layers * (per_layer + self.lora_params_per_layer())
                + e + head + projection)

    def lora_params_per_layer(self) -> int:
        """Adapter parameters of one layer: rank x (fan in + fan out) per adapted projection."""
        e, m, d = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        h, g = self.num_heads * d, self.num_kv_heads * d
        sizes = {"q": e + h, "k": e + g, "v": e + g, "o": h + e, "gate": e + m, "up": e + m,
                 "down": m + e}
        return self.lora_rank * sum(sizes[t] for t in self.lora_target_set)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nested RopeScaling becomes a dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error naming the source."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig fields {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_json(self) -> str:
        """The ``grit_config.json`` text (sorted keys: equal configs give equal files)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, directory: str) -> str:
        """Write ``grit_config.json`` into directory (local or gs://); returns its path."""
        path = storage.join(directory, CONFIG_FILE)
        storage.write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str) -> "ModelConfig":
        """Read ``grit_config.json`` from directory (local or gs://)."""
        path = storage.join(directory, CONFIG_FILE)
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no grit_jax model config here "
                                    f"(is {directory} a params directory written by grit_jax?)")
        try:
            data = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)


def tiny_config(family: str = "mistral", **kw) -> ModelConfig:
    """A few-layer config for tests and the CPU demo (real Mistral vocabulary)."""
    base = dict(family=family, vocab_size=32000, hidden_size=64, intermediate_size=112,
                num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=2048)
    if family == "mixtral":
        base.update(num_experts=4, num_experts_per_tok=2)
    base.update(kw)
    return ModelConfig(**base)
