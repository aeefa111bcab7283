"""The defaults every config starts from: each config file states only what differs.

Model fields are grit_jax.config.ModelConfig's, loss fields LossConfig's (their defaults, so a
config can override any of them from the command line: --config.model.remat_policy=minimal).
"""

import dataclasses

import ml_collections

from grit_jax.config import ModelConfig
from grit_jax.train_step import LossConfig


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every = 100
    c.checkpoint_every_minutes = 0.0  # also save when this much time has passed (0: off)
    c.keep_checkpoints = 2
    c.strict_resume = False  # a damaged newest checkpoint stops the run (default: older one)
    c.log_every = 10
    c.peak_flops = 0.0  # per device; 0: look the device up (grit_jax/hardware.py), none on CPU
    # Device mesh inside a slice (one -1 takes the remaining devices); dcn_mesh: across the
    # slices of a multislice pod (the data-centre network carries data parallelism only).
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1})
    c.dcn_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    # Weights to start from: a params directory, training workdir or Hugging Face directory;
    # "" = a random init of `model`. With init_from, only the execution fields of `model`
    # (dtype, param_dtype, remat_policy, attention_impl, scan_unroll, moe_impl) apply.
    c.init_from = ""
    model = {k: v for k, v in ModelConfig().to_dict().items() if k != "rope_scaling"}
    c.model = ml_collections.ConfigDict(model)
    c.data = ml_collections.ConfigDict(dict(
        data_dir="", query_batch=8, generative_batch=8, group_size=2, num_threads=2,
        # Examples per epoch per dataset ("msmarco=20000,nq=0.5x"; unlisted: all of them) and a
        # cap on each dataset (a fixed random subset; 0: none). See grit_jax.data.pipeline.
        mixture="", max_per_dataset=0,
        # Padded lengths per kind, e.g. passage="512,1024,2048" ("": powers of two from 16):
        # each combination is one compiled step program.
        buckets=ml_collections.ConfigDict({"query": "", "passage": "", "generative": ""})))
    c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-5, warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0))
    return c
