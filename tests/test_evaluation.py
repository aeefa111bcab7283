"""grit_jax.evaluation: metrics against hand counts and mteb's own evaluators, task files with
clear errors, held-out generative loss against an unchunked computation, the evaluate CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from grit_jax.evaluation import (classification_accuracy, clustering_v_measure, evaluate_task,
                                 load_task, retrieval_metrics, sts_spearman)
from grit_jax.evaluation.metrics import bootstrap_ci, per_query_retrieval
from grit_jax.inference import GritLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = "Given a question, retrieve a passage that answers it"
QUERIES = ["What is the capital of France?", "How do plants make food?",
           "Who wrote Hamlet?", "What is the speed of light?"]
DOCS = ["Paris is the capital and largest city of France.",
        "Photosynthesis lets plants turn light, water and CO2 into sugar.",
        "Hamlet is a tragedy written by William Shakespeare.",
        "Light travels at about 300,000 kilometres per second in vacuum.",
        "The Nile is the longest river in Africa.",
        "Bread is baked from flour, water and yeast."]


@pytest.fixture(scope="module")
def model(mistral_dir):
    return GritLM.from_pretrained(mistral_dir, attn="bbcc", pooling_method="mean")


def dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_retrieval_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3],    # relevant doc 2 ranked 2nd
                       [0.2, 0.8, 0.1, 0.7]])   # relevant docs 1 (1st) and 3 (2nd)
    rel = [{2: 1}, {1: 1, 3: 1}]
    m = retrieval_metrics(scores, rel, ks=(1, 2))
    ndcg0 = dcg([0, 1, 0, 0]) / dcg([1])
    ndcg1 = dcg([1, 1, 0, 0]) / dcg([1, 1])
    assert m["ndcg_at_10"] == pytest.approx((ndcg0 + ndcg1) / 2, abs=1e-12)
    assert m["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall_at_1"] == pytest.approx((0 + 1 / 2) / 2)
    assert m["recall_at_2"] == pytest.approx((1 + 1) / 2)
    per = per_query_retrieval(scores, rel, ks=(1, 2))
    np.testing.assert_allclose(per["ndcg_at_10"], [ndcg0, ndcg1], atol=1e-12)
    np.testing.assert_allclose(per["mrr_at_10"], [1 / 2, 1])
    # Two queries: the bootstrap means lie between the two per-query values.
    lo, hi = m["ndcg_at_10_ci95"]
    assert ndcg0 - 1e-12 <= lo < m["ndcg_at_10"] < hi <= ndcg1 + 1e-12
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval_metrics(scores, [{2: 1}, {0: 0}])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    values = rng.random(4000) < 0.3  # hits of a retriever that finds 30%
    small, large = bootstrap_ci(values[:100]), bootstrap_ci(values)
    assert small[0] < values[:100].mean() < small[1] and large[0] < values.mean() < large[1]
    assert large[1] - large[0] < 0.25 * (small[1] - small[0])
    # 95%: about 1.96 standard errors each side.
    se = values.std() / np.sqrt(len(values))
    assert abs((large[1] - large[0]) / (2 * 1.96 * se) - 1) < 0.15
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


def test_classification_and_clustering_on_separable_and_random_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    y = np.repeat(np.arange(3), 40)
    x = centers[y] + rng.normal(size=(120, 16))
    assert classification_accuracy(x[::2], y[::2], x[1::2], y[1::2])["accuracy"] == 1.0
    assert clustering_v_measure(x, y)["v_measure"] == pytest.approx(1.0)
    noise = rng.normal(size=(120, 16))
    assert clustering_v_measure(noise, y)["v_measure"] < 0.2
    sts = sts_spearman(x[:10], x[:10] + 0.01 * rng.normal(size=(10, 16)),
                       np.ones(10) * 5 - 0.1 * np.arange(10))
    assert -1 <= sts["spearman"] <= 1


def write_beir(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        for i, q in enumerate(QUERIES):
            f.write(json.dumps({"id": f"q{i}", "text": q, "instruction": INSTRUCTION}) + "\n")
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for i, d in enumerate(DOCS):
            f.write(json.dumps({"id": f"d{i}", "text": d}) + "\n")
    with open(os.path.join(folder, "qrels.jsonl"), "w") as f:
        for i in range(len(QUERIES)):
            f.write(json.dumps({"query_id": f"q{i}", "doc_id": f"d{i}", "score": 1}) + "\n")


def mteb_tasks():
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    common = dict(description="A local task for grit_jax's tests.", reference=None,
                  dataset={"path": "local", "revision": "local"}, category="t2t",
                  eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=[],
                  domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators=None,
                  modalities=["text"], sample_creation="created", bibtex_citation="")

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="GritLocalRetrieval",
                                main_score="ndcg_at_10", **common)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": f"q{i}", "text": q}
                                           for i, q in enumerate(QUERIES)]),
                corpus=Dataset.from_list([{"id": f"d{i}", "text": d, "title": ""}
                                          for i, d in enumerate(DOCS)]),
                relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(QUERIES))},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(type="STS", name="GritLocalSTS", main_score="cosine_spearman",
                                **common)
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):
            pairs = [(QUERIES[i], DOCS[j], 5.0 if i == j else float((i + 2 * j) % 4))
                     for i in range(len(QUERIES)) for j in range(len(QUERIES))]
            self.dataset = {"default": {"test": Dataset.from_list(
                [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in pairs])}}
            self.data_loaded = True

    return LocalRetrieval(), LocalSTS(), pairs_of(LocalSTS())


def pairs_of(task):
    task.load_data()
    return task.dataset["default"]["test"]


def test_mteb_runs_our_encoder_and_agrees_with_our_metrics(model, tmp_path):
    import mteb

    from grit_jax.evaluation.mteb_adapter import MtebEncoder

    retrieval, sts, pairs = mteb_tasks()
    encoder = MtebEncoder(model, instructions={"GritLocalRetrieval": INSTRUCTION,
                                               "GritLocalSTS": ""})
    result = mteb.evaluate(encoder, [retrieval, sts], cache=None, co2_tracker=False,
                           show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}

    write_beir(tmp_path / "beir")
    ours = evaluate_task(model, load_task(f"retrieval:{tmp_path / 'beir'}"))
    for k in ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_5"):
        assert scores["GritLocalRetrieval"][k] == pytest.approx(ours[k], abs=1e-4), k
    with open(tmp_path / "sts.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(dict(p)) + "\n")
    ours_sts = evaluate_task(model, load_task(f"sts:{tmp_path / 'sts.jsonl'}"))
    assert (scores["GritLocalSTS"]["cosine_spearman"]
            == pytest.approx(ours_sts["spearman"], abs=1e-6))
    # GRIT's convention: the retrieval instruction goes on queries only.
    from mteb.types import PromptType
    assert encoder.instruction_for(retrieval.metadata, PromptType.query) == INSTRUCTION
    assert encoder.instruction_for(retrieval.metadata, PromptType.document) == ""


def test_memo_embeds_a_shared_corpus_once(model, tmp_path):
    """Tasks over one corpus share its embeddings through ``memo``; the metrics do not change."""
    write_beir(tmp_path / "beir")
    task = load_task(f"retrieval:{tmp_path / 'beir'}")
    calls = []
    encode = model.encode
    model.encode = lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw)
    try:
        plain = evaluate_task(model, task)
        per_task = len(calls)  # the corpus and the queries
        memo = {}
        first = evaluate_task(model, task, memo=memo)
        second = evaluate_task(model, task, memo=memo)
    finally:
        del model.encode
    assert per_task >= 2 and len(task.data["corpus"]) in calls
    assert len(calls) == 2 * per_task  # the second memo call embedded nothing
    assert plain == first == second


def test_generative_loss_equals_unchunked_cross_entropy(model, tmp_path):
    from grit_jax.data import formats
    from tests.reference_losses import token_cross_entropy
    from grit_jax.model import forward, logits_fn

    chats = [["Say hi.", "Hi there!"], ["Name a colour.", "Blue.", "Another?", "Green, I think."]]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chats))
    got = evaluate_task(model, load_task(f"generative:{path}"))
    total, count = 0.0, 0
    for c in chats:
        e = formats.encode_chat(model.tokenizer, [{"role": "user" if i % 2 == 0 else "assistant",
                                                    "content": t} for i, t in enumerate(c)])
        ids, valid = e.ids[None], np.ones((1, len(e)), bool)
        logits = logits_fn(model.params, model.config,
                           forward(model.params, model.config, ids, valid, mode="causal").hidden)
        ce = np.asarray(token_cross_entropy(logits, ids))[0]
        total += float((ce * e.mask[1:]).sum())
        count += int(e.mask[1:].sum())
    assert got["tokens"] == count and got["samples"] == 2
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_task_errors_name_file_line_field(tmp_path):
    bad = tmp_path / "sts.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                   '{"sentence1": "a", "score": 2}\n')
    with pytest.raises(ValueError, match=r"sts.jsonl:2: sentence2: missing"):
        load_task(f"sts:{bad}")
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        load_task(f"ranking:{bad}")
    write_beir(tmp_path / "b")
    with open(tmp_path / "b" / "qrels.jsonl", "a") as f:
        f.write(json.dumps({"query_id": "q9", "doc_id": "d0", "score": 1}) + "\n")
    with pytest.raises(ValueError, match=r"qrels.jsonl:5: query_id: unknown id 'q9'"):
        load_task(f"retrieval:{tmp_path / 'b'}")


def test_cli_writes_json_and_refuses_bad_tasks(mistral_dir, tmp_path):
    write_beir(tmp_path / "beir")
    grit = tmp_path / "grit.jsonl"
    grit.write_text("".join(json.dumps({"query": [INSTRUCTION, q], "pos": [["", DOCS[i]]],
                                        "neg": [["", DOCS[4]]]}) + "\n"
                            for i, q in enumerate(QUERIES)))
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}]}) + "\n")
    cls = tmp_path / "cls"
    cls.mkdir()
    for split in ("train", "test"):
        (cls / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(DOCS)))
    clu = tmp_path / "clu.jsonl"
    clu.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n"
                           for i, t in enumerate(DOCS)))
    from grit_jax.data import adapt
    from demo.wikipedia import articles

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, (title, paras) in enumerate(articles()[:12]):
        (docs / f"{i}.md").write_text(f"# {title}\n\n" + "\n\n".join(paras[:2]) + "\n\n## More"
                                      "\n\n" + "\n\n".join(paras[2:4]) + "\n")
    report = adapt.adapt(str(docs), str(tmp_path / "adapted"), eval_fraction=0.5)
    assert set(report["retrieval"]) == set(adapt.RETRIEVAL)
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "grit_jax.evaluation", "--model", mistral_dir,
           "--task", f"retrieval:{tmp_path / 'beir'}", "--task", f"retrieval:wiki={grit}",
           "--task", f"generative:{gen}", "--task", f"classification:{cls}",
           "--task", f"clustering:{clu}", "--task", f"adapted:{tmp_path / 'adapted'}",
           "--out", str(out)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["tasks"]
    held_out = {f"retrieval/adapted/{t}" for t in adapt.RETRIEVAL} | {"generative/adapted/chat"}
    assert set(r) == {"retrieval/beir", "retrieval/wiki", "generative/gen",
                      "classification/cls", "clustering/clu"} | held_out
    for t in adapt.RETRIEVAL:  # every eval passage is a candidate; intervals around the mean
        m = r[f"retrieval/adapted/{t}"]
        assert m["documents"] == report["retrieval"][t]["corpus"] == report["passages"]["eval"]
        assert m["queries"] == report["retrieval"][t]["queries"]
        assert m["ndcg_at_10_ci95"][0] <= m["ndcg_at_10"] <= m["ndcg_at_10_ci95"][1]
    assert r["retrieval/wiki"]["documents"] == 5 and r["retrieval/beir"]["documents"] == 6
    assert 0 <= r["retrieval/beir"]["ndcg_at_10"] <= 1 and r["generative/gen"]["loss"] > 0
    bad = subprocess.run(cmd[:5] + ["--task", f"sts:{gen}"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and "gen.jsonl:1: sentence1: missing" in bad.stderr
