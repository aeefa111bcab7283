"""The demo dataset from real Wikipedia pages (gensim's test data): built, held-out, sane."""

import json
import os

import pytest

from demo import wikipedia
from grit_jax.data.pipeline import GritBatches, PipelineConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki")
    dirs = wikipedia.make_demo_data(str(out), max_lengths={"query": 64, "passage": 128,
                                                           "generative": 128})
    return str(out), dirs


def test_clean_wikitext():
    raw = ("'''Anarchism''' is a [[political philosophy]] that {{cite|x={{y}}}} advocates "
           "[[self-governance|self-governed]] societies.<ref>Book</ref> [[File:A.jpg|thumb|a "
           "[[b]] c]]")
    assert wikipedia.clean_wikitext(raw).strip() == (
        "Anarchism is a political philosophy that  advocates self-governed societies.")


def test_articles_are_real_and_split(demo):
    out, dirs = demo
    arts = wikipedia.articles()
    assert len(arts) > 80 and any(t == "Anarchism" for t, _ in arts)
    titles = {}
    for split in ("train", "eval"):
        with open(os.path.join(out, "jsonl", split, "wiki_title_to_passage.jsonl")) as f:
            titles[split] = {json.loads(row)["query"][1] for row in f}
    assert titles["train"] and titles["eval"] and not titles["train"] & titles["eval"]


def test_demo_data_feeds_the_pipeline(demo, tokenizer):
    _, dirs = demo
    g = GritBatches(PipelineConfig(dirs["train"], query_batch=8, generative_batch=8))
    b = g.local_batch(0)
    q = tokenizer.decode(b["query_ids"][0][b["query_valid"][0]])
    assert "<|embed|>" in q and b["passage_ids"].shape[0] == 16
    assert b["gen_loss"].sum() > 0
