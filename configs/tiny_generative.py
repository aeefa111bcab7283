"""configs/tiny.py trained on the next-token loss only (the paper's generative-only baseline)."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.loss.mode = "generative"
    return c
