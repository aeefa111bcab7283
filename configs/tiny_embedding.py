"""configs/tiny.py trained on the contrastive loss only (the paper's embedding-only baseline)."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.loss.mode = "embedding"
    return c
