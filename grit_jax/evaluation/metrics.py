"""Embedding metrics as pure functions of arrays; scikit-learn and scipy do the math they have."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def retrieval_metrics(scores: np.ndarray, relevant: Sequence[Mapping[int, float]],
                      ks: Sequence[int] = (1, 5, 10, 100), *, bootstrap: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@k of a (queries, documents) score matrix, with 95% bootstrap
    intervals of nDCG@10 and MRR@10 over queries (``*_ci95``: [low, high]; ``bootstrap=0``: none).

    ``relevant[i]`` maps document index -> graded relevance (> 0 is relevant) for query i.
    nDCG uses scikit-learn's ``ndcg_score`` (linear gains, log2 discount, ties averaged).
    """
    per = per_query_retrieval(scores, relevant, ks)
    out = {k: float(np.mean(v)) for k, v in per.items()}
    if bootstrap:
        for k in ("ndcg_at_10", "mrr_at_10"):
            out[f"{k}_ci95"] = bootstrap_ci(per[k], n=bootstrap, seed=seed)
    return out


def per_query_retrieval(scores: np.ndarray, relevant: Sequence[Mapping[int, float]],
                        ks: Sequence[int] = (1, 5, 10, 100)) -> dict[str, np.ndarray]:
    """The metrics of retrieval_metrics for each query (their means are the task's)."""
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
    out = {"ndcg_at_10": np.asarray([ndcg_score(gains[i:i + 1], scores[i:i + 1], k=10)
                                     if d > 1 else 1.0 for i in range(q)])}
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(gains > 0, order, axis=1)
    first = np.where(hits.any(1), hits.argmax(1), d)
    out["mrr_at_10"] = np.where(first < 10, 1.0 / (first + 1), 0.0)
    n_rel = (gains > 0).sum(1)
    for k in ks:
        out[f"recall_at_{k}"] = hits[:, :k].sum(1) / n_rel
    return out


def bootstrap_ci(values, *, n: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


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
