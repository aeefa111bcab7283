"""The CPU mixture of experts: tiny.py's model with a Mixtral MoE (8 experts, top 2) per layer.

python -m grit_jax.train --config configs/tiny_moe.py --workdir /tmp/tiny_moe
Expert parallelism on a mesh: --config.mesh.expert=N (N divides model.num_experts; the expert
axis also splits the batch).
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.update(dict(family="mixtral", intermediate_size=176, num_experts=8,
                        num_experts_per_tok=2, router_aux_loss_coef=0.02))
    return c
