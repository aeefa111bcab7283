"""Embedding metrics as pure functions of arrays; scikit-learn and scipy do the math they have."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def retrieval_metrics(scores: np.ndarray, relevant: Sequence[Mapping[int, float]],
                      ks: Sequence[int] = (1, 5, 10, 100)) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@k of a (queries, documents) score matrix.

    ``relevant[i]`` maps document index -> graded relevance (> 0 is relevant) for query i.
    nDCG uses scikit-learn's ``ndcg_score`` (linear gains, log2 discount, ties averaged).
    """
    from sklearn.metrics import ndcg_score

    scores = np.asarray(scores, np.float64)
    q, d = scores.shape
    if len(relevant) != q:
        raise ValueError(f"{len(relevant)} relevance sets for {q} queries")
    if any(not any(g > 0 for g in r.values()) for r in relevant):
        raise ValueError("every query needs at least one relevant document")
    gains = np.zeros((q, d))
    for i, r in enumerate(relevant):
        for j, g in r.items():
            gains[i, j] = g
    out = {"ndcg_at_10": float(ndcg_score(gains, scores, k=10)) if d > 1 else 1.0}
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(gains > 0, order, axis=1)
    first = np.where(hits.any(1), hits.argmax(1), d)
    out["mrr_at_10"] = float(np.mean(np.where(first < 10, 1.0 / (first + 1), 0.0)))
    n_rel = (gains > 0).sum(1)
    for k in ks:
        out[f"recall_at_{k}"] = float(np.mean(hits[:, :k].sum(1) / n_rel))
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def sts_spearman(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> dict[str, float]:
    """Spearman (and Pearson) correlation of pair cosine similarities with gold scores."""
    from scipy.stats import pearsonr, spearmanr

    sims = _cosine_rows(np.asarray(emb1, np.float64), np.asarray(emb2, np.float64))
    return {"spearman": float(spearmanr(sims, gold).statistic),
            "pearson": float(pearsonr(sims, gold).statistic)}


def classification_accuracy(train_x, train_y, test_x, test_y, *, seed: int = 0) -> dict[str, float]:
    """Logistic regression on embeddings: test accuracy and macro F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(train_x, train_y)
    pred = clf.predict(test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "f1_macro": float(f1_score(test_y, pred, average="macro"))}


def clustering_v_measure(x: np.ndarray, labels: Sequence, *, seed: int = 0,
                         n_init: int = 10) -> dict[str, float]:
    """k-means with k = number of gold labels; V-measure of the clusters against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    k = len(set(labels))
    pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(x))
    return {"v_measure": float(v_measure_score(labels, pred))}
