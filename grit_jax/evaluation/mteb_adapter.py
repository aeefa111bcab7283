"""A ``GritLM`` as an mteb (>= 2.0) encoder: ``mteb.evaluate(MtebEncoder(model), tasks)``.

GRIT's convention, as in the paper's evaluation: queries (and both sides of symmetric tasks such
as STS or clustering) carry the task's instruction; retrieval documents carry none. The
instruction comes from ``instructions[task name]`` if given, else from mteb's prompt lookup
(the task's own ``prompt`` metadata, then mteb's defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType


class MtebEncoder(AbsEncoder):
    """mteb's EncoderProtocol over a GritLM (encode + cosine similarity)."""

    def __init__(self, model, *, name: str = "grit_jax/model", revision: str = "local",
                 instructions: Mapping[str, str] | None = None, batch_size: int = 16,
                 max_length: int | None = None):
        self.model = model
        self.instructions = dict(instructions or {})
        self.batch_size, self.max_length = batch_size, max_length
        cfg = model.config
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name, revision=revision, release_date=None, languages=None,
            n_parameters=cfg.num_params(), memory_usage_mb=None,
            max_tokens=cfg.max_position_embeddings, embed_dim=cfg.embedding_dim, license=None,
            open_weights=True, public_training_code=None, public_training_data=None,
            framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
            training_datasets=None)

    def instruction_for(self, task_metadata, prompt_type: PromptType | None) -> str:
        if prompt_type == PromptType.document:
            return ""
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        return self.get_instruction(task_metadata, prompt_type) or ""

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        if not texts:
            raise ValueError(f"mteb task {task_metadata.name}: nothing to encode")
        return self.model.encode(texts,
                                 instruction=self.instruction_for(task_metadata, prompt_type),
                                 batch_size=self.batch_size, max_length=self.max_length)
