"""Losses against a torch re-statement of the reference's DistributedContrastiveLoss /
NextTokenLoss.

The published gritlm wheels (0.9-1.0.2) ship only inference code, so `gritlm.training.model`
cannot be imported here; `TorchReference` restates its semantics (CrossEntropyLoss over
q @ p.T / temperature with target i * P/Q; shift-by-one CE with ignore_index=-100, mean for
"mixed" per micro-batch, sum / batch size for "token").
"""

import numpy as np
import pytest

from grit_jax.losses import contrastive_loss
from tests.reference_losses import aggregate, generative_loss, token_cross_entropy


class TorchReference:
    @staticmethod
    def contrastive(q, p, temperature):
        import torch

        q, p = torch.tensor(q), torch.tensor(p)
        scores = (q @ p.T) / temperature
        target = torch.arange(q.shape[0]) * (p.shape[0] // q.shape[0])
        return torch.nn.CrossEntropyLoss(reduction="mean")(scores, target).item()

    @staticmethod
    def next_token(logits, ids, mask, how, micro_batch):
        """Per micro-batch losses averaged, as DDP/grad accumulation average per-batch losses."""
        import torch

        labels = torch.tensor(np.where(mask == 1, ids, -100)).long()
        logits = torch.tensor(logits)
        losses = []
        for s in range(0, len(ids), micro_batch):
            lab, lg = labels[s:s + micro_batch], logits[s:s + micro_batch]
            shift_logits = lg[:, :-1].reshape(-1, lg.shape[-1])
            shift_labels = lab[:, 1:].reshape(-1)
            if how == "token":
                ce = torch.nn.CrossEntropyLoss(reduction="sum")(shift_logits, shift_labels)
                losses.append(ce / lab.shape[0])
            else:
                losses.append(
                    torch.nn.CrossEntropyLoss(reduction="mean")(shift_logits, shift_labels))
        return torch.stack(losses).mean().item()


@pytest.mark.parametrize("group", [1, 2, 4])
def test_contrastive_matches_reference(group):
    rng = np.random.RandomState(group)
    q = rng.randn(6, 16).astype(np.float32)
    p = rng.randn(6 * group, 16).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    for t in (0.02, 0.05, 1.0):
        got = float(contrastive_loss(q, p, t))
        assert abs(got - TorchReference.contrastive(q, p, t)) <= 1e-5 * max(1.0, abs(got))


def _gen_inputs(b=8, t=12, v=50, seed=0):
    rng = np.random.RandomState(seed)
    logits = rng.randn(b, t, v).astype(np.float32) * 3
    ids = rng.randint(0, v, (b, t))
    mask = (rng.rand(b, t) < 0.6).astype(np.int32)
    mask[:, 0] = 0
    mask[:, 1] = 1  # every sample has at least one loss token
    return logits, ids, mask


def test_mixed_with_one_sub_batch_is_the_reference_mean():
    logits, ids, mask = _gen_inputs()
    got = float(generative_loss(logits, ids, mask, "mixed", sub_batch=8))
    assert abs(got - TorchReference.next_token(logits, ids, mask, "mixed", 8)) <= 1e-5


def test_mixed_over_sub_batches_is_the_mean_of_micro_batch_means():
    logits, ids, mask = _gen_inputs(b=8)
    got = float(generative_loss(logits, ids, mask, "mixed", sub_batch=2))
    assert abs(got - TorchReference.next_token(logits, ids, mask, "mixed", 2)) <= 1e-5


def test_token_aggregation_matches_reference():
    logits, ids, mask = _gen_inputs()
    got = float(generative_loss(logits, ids, mask, "token"))
    want = TorchReference.next_token(logits, ids, mask, "token", len(ids))
    assert abs(got - want) <= 1e-5 * abs(want)


def test_sample_aggregation():
    logits, ids, mask = _gen_inputs()
    ce = np.asarray(token_cross_entropy(logits, ids))
    m = mask[:, 1:]
    want = np.mean((ce * m).sum(1) / m.sum(1))
    assert abs(float(aggregate(ce, m, "sample")) - want) <= 1e-6


def test_bad_aggregation():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(np.zeros((1, 2)), np.ones((1, 2)), "median")
