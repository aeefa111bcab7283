"""configs/tiny.py with causal attention for embeddings and position-weighted mean pooling (the
paper's ablation of GRIT's bidirectional attention + mean pooling)."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.loss.update(dict(attn="cccc", pooling="weightedmean"))
    return c
