"""Tiny random transformers models for parity tests (built locally, no hub)."""

import json
import os
import shutil

import numpy as np

from grit_jax.data.tokenizers import default_tokenizer_path

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
    "padding_side": "right", "clean_up_tokenization_spaces": False,
}

CONFIGS = {
    # grouped-query heads (6 q / 2 kv), odd MLP, rope theta != 10000, untied head
    "mistral": dict(vocab_size=32000, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0,
                    sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
                    max_position_embeddings=512),
    # tied embeddings, head_dim != hidden/heads, llama3 rope scaling, 1 kv head
    "llama": dict(vocab_size=32000, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=512,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    # 3 experts (not a power of two), top-2, grouped-query heads, untied head
    "mixtral": dict(vocab_size=32000, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                    num_experts_per_tok=2, rope_theta=1e6, sliding_window=None,
                    tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=512),
}


def build(family: str, seed: int = 0, **overrides):
    """A random tiny transformers causal LM in float32, eval mode."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MixtralConfig, MixtralForCausalLM)

    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM),
                          "llama": (LlamaConfig, LlamaForCausalLM),
                          "mixtral": (MixtralConfig, MixtralForCausalLM)}[family]
    kw = dict(CONFIGS[family])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # default init leaves norms at 1: randomise them too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        if family == "mixtral":
            randomise_moe(model)
    return model


def randomise_moe(model):
    """Experts at fan-in scale (default init leaves their output ~1e-3, too small to tell them
    apart) and a router with logits of std ~2, so routing is decisive and not near-uniform."""
    import torch

    # 5.x names (mlp.experts.gate_up_proj, mlp.gate) or 4.x (block_sparse_moe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(2 * torch.randn_like(p) / p.shape[-1] ** 0.5)


def write_tokenizer(directory):
    """The real Mistral SentencePiece model plus a LlamaTokenizer config."""
    shutil.copyfile(default_tokenizer_path(), os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)


def save_tiny(directory, family: str, seed: int = 0, **overrides) -> str:
    """Save a tiny model with transformers' own save_pretrained, plus the tokenizer."""
    model = build(family, seed, **overrides)
    model.save_pretrained(str(directory))
    write_tokenizer(str(directory))
    return str(directory)


def hf_logits(model, ids, valid):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids, np.int64)),
                     attention_mask=torch.tensor(np.asarray(valid, np.int64))).logits.numpy()


def hf_hidden(model, ids, valid, bidirectional: bool):
    import torch

    kw = {"is_causal": False} if bidirectional else {}
    with torch.no_grad():
        return model.model(input_ids=torch.tensor(np.asarray(ids, np.int64)),
                           attention_mask=torch.tensor(np.asarray(valid, np.int64)),
                           **kw).last_hidden_state.numpy()
