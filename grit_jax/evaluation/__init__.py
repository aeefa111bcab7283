"""Evaluation of GRIT models: embedding metrics, generative loss, task files and an mteb adapter."""

from grit_jax.evaluation.metrics import (classification_accuracy, clustering_v_measure,
                                         retrieval_metrics, sts_spearman)
from grit_jax.evaluation.tasks import TASK_KINDS, evaluate_task, load_task

__all__ = ["TASK_KINDS", "classification_accuracy", "clustering_v_measure", "evaluate_task",
           "load_task", "retrieval_metrics", "sts_spearman"]
