"""RAG: caching modes equal uncached generation (causal embeddings), index/store round trips,
refusals of foreign or damaged stores, the CLI, and a sharded GritLM."""

import json
import os

import numpy as np
import pytest

from grit_jax.inference import GritLM
from grit_jax.weights import load as load_model
from grit_jax.rag import RAG, DenseIndex, StoreMismatch, prompts, read_corpus
from grit_jax.rag.__main__ import main as rag_main
from grit_jax.rag.index import faiss_available

DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and most populous city of "
     "France, on the Seine river in the north of the country."},
    {"id": "rhine", "title": "Rhine", "text": "The Rhine rises in the Swiss Alps, forms part of "
     "the borders of Switzerland, Liechtenstein, Austria, Germany and France, and flows into the "
     "North Sea in the Netherlands."},
    {"id": "vaccine", "text": "Vaccines expose the immune system to a harmless piece of a "
     "pathogen so that it learns to recognise the real thing."},
    {"id": "tea", "title": "Tea", "text": "Tea is an aromatic beverage prepared by pouring hot "
     "water over cured leaves of Camellia sinensis."},
]
QUERIES = ["What is the capital of France?", "Where does the Rhine flow?"]


@pytest.fixture(scope="module")
def causal_rag(mistral_dir, tmp_path_factory):
    model = GritLM.from_pretrained(mistral_dir, attn="cccc")
    return RAG.build(model, DOCS, str(tmp_path_factory.mktemp("index_cccc")), batch_size=3)


@pytest.fixture(scope="module")
def bidir_rag(mistral_dir, tmp_path_factory):
    model = GritLM.from_pretrained(mistral_dir, attn="bbcc")
    return RAG.build(model, DOCS, str(tmp_path_factory.mktemp("index_bbcc")))


def uncached(rag, query, cache, rows, new):
    """The same answer without reusing states: cached ids + suffix ids read in one causal pass."""
    tok, model = rag.model.tokenizer, rag.model
    texts = [rag.docs[r]["title"] + " " + rag.docs[r]["text"] if rag.docs[r]["title"]
             else rag.docs[r]["text"] for r in rows]
    if cache == "doc":
        prefix = rag.store[rows[0]].ids.tolist()
    else:  # query: the query's embedding input
        prefix = model.tokenize_for_embedding([query])[0].ids.tolist()
    suffix = tok.encode(prompts.after_cache(cache, query, texts))
    return model.generate_tokens([prefix + suffix], max_new_tokens=new)[0]


@pytest.mark.parametrize("cache", ["doc", "query"])
def test_cached_generation_equals_uncached_with_causal_embeddings(causal_rag, cache):
    answers = causal_rag.answer(QUERIES, cache=cache, max_new_tokens=12)
    for q, a in zip(QUERIES, answers):
        assert a.cached_tokens > 5 and len(a.tokens) == 12
        assert a.tokens == uncached(causal_rag, q, cache, a.doc_ids, 12), (cache, q)


def test_mixture_of_experts_rag(mixtral_dir, tmp_path):
    """A Mixtral serves the same RAG API: with causal embeddings every cached answer equals the
    uncached one; the joined-cache modes answer too."""
    model = GritLM.from_pretrained(mixtral_dir, attn="cccc")
    assert model.config.is_moe
    rag = RAG.build(model, DOCS, str(tmp_path / "index"), batch_size=4)
    for cache in ("doc", "query"):
        for q, a in zip(QUERIES, rag.answer(QUERIES, cache=cache, max_new_tokens=8)):
            assert a.cached_tokens > 5 and len(a.tokens) == 8
            assert a.tokens == uncached(rag, q, cache, a.doc_ids, 8), (cache, q)
    for cache in ("query-doc", "doc-query"):
        assert all(len(a.tokens) == 8 for a in rag.answer(QUERIES, cache=cache,
                                                          max_new_tokens=8))


def test_bidirectional_embedding_states_differ_from_causal(causal_rag, bidir_rag):
    c, b = causal_rag.store[1], bidir_rag.store[1]
    assert c.ids.tolist() == b.ids.tolist()
    assert np.abs(c.k[-1] - b.k[-1]).max() > 1e-3  # the last layer sees the whole document
    a_c = causal_rag.answer(QUERIES[0], cache="doc", max_new_tokens=4)
    assert a_c.doc_ids == causal_rag.answer(QUERIES[0], max_new_tokens=1).doc_ids


def test_retrieval_finds_the_document_itself(bidir_rag):
    # The same text in the same format embeds identically: every document retrieves itself.
    texts = [d["title"] + " " + d["text"] if d.get("title") else d["text"] for d in DOCS]
    scores, rows = bidir_rag.retrieve(texts, top_k=2)
    assert rows[:, 0].tolist() == list(range(len(DOCS)))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (scores[:, 1] < scores[:, 0]).all()


@pytest.mark.parametrize("cache", [None, "query", "doc", "query-doc", "doc-query"])
def test_every_mode_answers_with_two_documents(bidir_rag, cache):
    a = bidir_rag.answer(QUERIES[1], cache=cache, top_k=2, max_new_tokens=5,
                         answer_prefix="The answer is")
    assert len(a.doc_ids) == 2 and len(set(a.doc_ids)) == 2 and len(a.tokens) <= 5
    assert a.scores[0] >= a.scores[1]
    store, tok = bidir_rag.store, bidir_rag.model.tokenizer
    qlen = len(bidir_rag.model.tokenize_for_embedding([QUERIES[1]])[0])
    dlen = [len(store[r]) for r in a.doc_ids]
    # Joined caches keep one BOS: every part after the first loses its own.
    want = {None: 0, "query": qlen, "doc": sum(dlen) - 1, "query-doc": qlen + sum(dlen) - 2,
            "doc-query": sum(dlen) + qlen - 2}[cache]
    assert a.cached_tokens == want
    assert (a.prompt_tokens > sum(dlen)) == (cache in (None, "query"))
    assert tok.decode(tok.encode("The answer is")) == "The answer is"


def test_no_retrieval_and_bad_requests(bidir_rag, tmp_path):
    a = bidir_rag.answer("Hello there", retrieval=False, max_new_tokens=3)
    assert a.doc_ids == [] and a.cached_tokens == 0
    with pytest.raises(ValueError, match="no queries"):
        bidir_rag.answer([])
    with pytest.raises(ValueError, match="query 1 is empty"):
        bidir_rag.answer(["fine", "  "])
    with pytest.raises(ValueError, match="cache must be one of"):
        bidir_rag.answer("x", cache="docs")
    with pytest.raises(ValueError, match="needs retrieval"):
        bidir_rag.answer("x", cache="doc", retrieval=False)
    plain = RAG.build(bidir_rag.model, DOCS[:2], str(tmp_path / "plain"), cache_docs=False)
    assert plain.store is None
    with pytest.raises(ValueError, match="built without them"):
        plain.answer("x", cache="doc")
    assert plain.answer("x", cache="query", max_new_tokens=2).cached_tokens > 0


def test_index_reload_and_refusals(bidir_rag, mistral_dir, tmp_path):
    import shutil

    src = os.path.dirname(bidir_rag.store.directory)
    again = RAG.load(src, bidir_rag.model)
    assert [d["id"] for d in again.docs] == [d["id"] for d in DOCS]
    np.testing.assert_array_equal(again.store[2].k, bidir_rag.store[2].k)
    # Built with another attention mode: refused.
    with pytest.raises(StoreMismatch, match="attn"):
        RAG.load(src, GritLM(bidir_rag.model.params, bidir_rag.model.config,
                             bidir_rag.model.tokenizer, attn="cccc"))
    # Built by other weights: refused, by fingerprint.
    params, config = load_model(mistral_dir)
    params = dict(params, final_norm={"scale": params["final_norm"]["scale"] * 1.01})
    other = GritLM(params, config, bidir_rag.model.tokenizer)
    assert other.fingerprint != bidir_rag.model.fingerprint
    with pytest.raises(StoreMismatch, match="another model"):
        RAG.load(src, other)
    # Damaged files: named in the error.
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    with open(os.path.join(bad, "kv", "kv.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"kv\.bin: 100 bytes"):
        RAG.load(bad, bidir_rag.model)
    os.remove(os.path.join(bad, "embeddings.npy"))
    with pytest.raises(FileNotFoundError, match="embeddings.npy"):
        RAG.load(bad, bidir_rag.model)
    with open(os.path.join(bad, "index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="index.json: unreadable"):
        RAG.load(bad, bidir_rag.model)
    with pytest.raises(FileNotFoundError, match="index.json"):
        RAG.load(str(tmp_path), bidir_rag.model)


def test_corpus_errors_name_file_line_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:3: text: missing or empty"):
        read_corpus(str(path))
    path.write_text('{"text": "fine", "title": 3}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:1: title: expected a string"):
        read_corpus(str(path))
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2"):
        read_corpus(str(path))


def test_dense_index_exact_top_k():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    scores, ids = DenseIndex(emb, backend="jax").search(q, 7)
    want = np.argsort(-(q @ emb.T), axis=1)[:, :7]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ emb.T, want, 1), rtol=1e-5)
    s1, i1 = DenseIndex(emb, backend="jax").search(q[0], 3)
    assert i1.shape == (3,) and i1.tolist() == want[0, :3].tolist()
    with pytest.raises(ValueError, match="between 1 and"):
        DenseIndex(emb).search(q, 301)
    with pytest.raises(ValueError, match="not finite"):
        DenseIndex(np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="do not match the index dimension"):
        DenseIndex(emb).search(q[:, :3], 1)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed")
def test_faiss_backend_equals_jax():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(2000, 32)).astype(np.float32)
    q = rng.normal(size=(9, 32)).astype(np.float32)
    sj, ij = DenseIndex(emb, backend="jax").search(q, 10)
    sf, i_f = DenseIndex(emb, backend="faiss").search(q, 10)
    np.testing.assert_array_equal(ij, i_f)
    np.testing.assert_allclose(sj, sf, rtol=1e-5)


def test_cli_index_and_ask(mistral_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = str(tmp_path / "idx")
    assert rag_main(["index", "--model", mistral_dir, "--corpus", str(corpus), "--out", out]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["docs"] == 4 and built["cached"]
    assert rag_main(["ask", "--model", mistral_dir, "--index", out, "--query", QUERIES[0],
                     "--cache", "doc", "--max-new-tokens", "4", "--top-k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cache"] == "doc" and len(res["answers"][0]["docs"]) == 2
    assert res["answers"][0]["cached_tokens"] > 0
    # A wrong model for the index: exit 2 with the reason.
    assert rag_main(["ask", "--model", mistral_dir, "--attn", "cccc", "--index", out,
                     "--query", "x"]) == 2
    assert "attn" in capsys.readouterr().err


def test_build_counts_truncated_documents_once(bidir_rag, tmp_path, caplog):
    """A document of exactly max_length tokens is not truncated; the cut ones are counted in
    index.json and in one warning, however many chunks the build embeds them in."""
    import logging

    model = bidir_rag.model
    texts = [d["title"] + " " + d["text"] if d.get("title") else d["text"] for d in DOCS]
    lengths = [len(e) for e in model.tokenize_for_embedding(texts)]
    limit = min(lengths)
    with caplog.at_level(logging.WARNING, logger="grit_jax.inference"):
        rag = RAG.build(model, DOCS, str(tmp_path / "index"), batch_size=2, max_length=limit)
    assert rag.meta["truncated_docs"] == sum(n > limit for n in lengths) > 0
    assert [r.message.count("truncated") for r in caplog.records] == [1]


def test_encode_and_generate_reject_empty_input(bidir_rag):
    model = bidir_rag.model
    with pytest.raises(ValueError, match="no sentences"):
        model.encode([])
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        model.encode(["a", ""])
    with pytest.raises(ValueError, match="no prompts"):
        model.generate([])


@pytest.mark.parametrize("family,mesh_shape", [("mistral", (1, 4, 2)),
                                               ("mixtral", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_model_equals_single_device(request, family, mesh_shape):
    import jax

    from tests.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

    path = request.getfixturevalue(f"{family}_dir")
    with jax.enable_x64(True):  # equal up to reduction order: compared in float64
        single = GritLM.from_pretrained(path, dtype="float64")
        sharded = GritLM.from_pretrained(path, mesh_shape=mesh_shape, dtype="float64")
        ffn = "mlp" if family == "mistral" else "moe"

        def assert_sharded(leaf):
            assert len(leaf.sharding.device_set) == 8
            assert leaf.addressable_shards[0].data.shape != leaf.shape

        assert_sharded(sharded.params["layers"][ffn]["up"])  # the stack, until a generation
        assert jax.device_count() == 8
        texts = [d["text"] for d in DOCS]
        got, want = sharded.encode(texts), single.encode(texts)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
        assert sharded.generate(QUERIES, max_new_tokens=6) == single.generate(QUERIES,
                                                                              max_new_tokens=6)
        assert_sharded(sharded.params["layer_0"][ffn]["up"])  # split, keeping the sharding
        assert sharded.fingerprint == single.fingerprint
