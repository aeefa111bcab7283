"""Batches: one dataset per batch, deterministic, disjoint/covering process slices, exact resume."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from grit_jax import sharding
from grit_jax.data import formats
from grit_jax.data.dataset import build
from grit_jax.data.pipeline import GritBatches, PipelineConfig, global_batch, pad_to

SIZES = {"a": 10, "b": 7, "c": 5}  # embedding files
GEN = 9


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name, n in SIZES.items():
        recs = [{"query": [f"Task {name}", f"{name} query {i} " + "x " * (i % 4)],
                 "pos": [f"{name} pos {i} {j}" for j in range(1 + i % 2)],
                 "neg": [f"{name} neg {i} {j}" for j in range(1 + i % 3)]} for i in range(n)]
        (src / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    gen = [{"text": [f"question {i}", f"answer {i} " + "y " * i]} for i in range(GEN)]
    (src / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    out = tmp_path_factory.mktemp("built")
    build(str(src), str(out), max_lengths={"query": 32, "passage": 32, "generative": 64})
    return str(out)


def cfg(data_dir, **kw):
    base = dict(query_batch=4, generative_batch=4, group_size=2, num_epochs=2, seed=0,
                smallest_bucket=8, num_threads=2)
    base.update(kw)
    return PipelineConfig(data_dir, **base)


def test_epoch_plan(data_dir):
    g = GritBatches(cfg(data_dir))
    assert g.emb_steps == 2 + 1 + 1 + 1 and g.emb_dropped == 2  # leftovers 2+3+1 -> 1 mixed batch
    assert g.gen_steps == 2 and g.gen_dropped == 1
    for epoch in range(2):
        plan = g.embedding_plan(epoch)
        seen = [x for b in plan for x in b]
        assert len(seen) == len(set(seen)) == sum(SIZES.values()) - 2
        single = [b for b in plan if len({d for d, _ in b}) == 1]
        assert len(single) >= 4  # the per-dataset batches (a mixed one may by chance be single)
    assert g.embedding_plan(0) != g.embedding_plan(1)


def test_batch_contents(data_dir, tokenizer):
    g = GritBatches(cfg(data_dir))
    b = g.local_batch(0)
    assert b["query_ids"].shape[0] == 4 and b["passage_ids"].shape[0] == 8
    assert b["gen_ids"].shape[0] == 4
    assert b["query_ids"].shape[1] in (8, 16, 32)  # a bucket
    for i in range(4):
        q = tokenizer.decode(b["query_ids"][i][b["query_pool"][i] == 1])
        pos = tokenizer.decode(b["passage_ids"][2 * i][b["passage_pool"][2 * i] == 1])
        neg = tokenizer.decode(b["passage_ids"][2 * i + 1][b["passage_pool"][2 * i + 1] == 1])
        name, _, idx = q.split()[:3]
        assert pos.startswith(f"{name} pos {idx} ") and neg.startswith(f"{name} neg {idx} ")
    assert not (b["query_pool"] & ~b["query_valid"]).any()


def test_context_tokens_reach_the_batch(tmp_path, tokenizer):
    """A chat's cached document is stored with its tokens marked and comes back as
    ``gen_context`` (exactly the document's embedding-format tokens), apart from the loss mask;
    chats without one have none."""
    doc, answer = "Tides are caused by the Moon.", "The Moon."
    chat = [{"role": "user", "content": "What causes tides?"},
            {"role": "assistant", "content": answer}]
    recs = [{"context": doc, "messages": chat}, {"messages": chat}]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    build(str(tmp_path), str(tmp_path / "built"))
    b = GritBatches(PipelineConfig(str(tmp_path / "built"), generative_batch=2, num_epochs=1,
                                   seed=0, smallest_bucket=8, num_threads=1,
                                   mode="generative")).local_batch(0)
    doc_ids = formats.encode_embed(tokenizer, doc).ids.tolist()
    rows = sorted(range(2), key=lambda i: -int(b["gen_context"][i].sum()))
    cached, plain = rows
    assert b["gen_ids"][cached][b["gen_context"][cached]].tolist() == doc_ids
    assert b["gen_ids"][cached][:len(doc_ids)].tolist() == doc_ids
    assert not b["gen_context"][plain].any()
    for i in rows:
        assert tokenizer.decode(b["gen_ids"][i][b["gen_loss"][i] == 1][:-1]) == answer
    assert GritBatches(PipelineConfig(str(tmp_path / "built"), generative_batch=2,
                                      mode="generative")).context_examples() == 1
    # A dataset built before documents were marked (no counts in its metadata) is named.
    meta_file = next((tmp_path / "built").rglob("metadata.json"))
    meta = json.loads(meta_file.read_text())
    del meta["datasets"]["gen"]["context"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="built before documents of context chats were marked"):
        GritBatches(PipelineConfig(str(tmp_path / "built"), generative_batch=2,
                                   mode="generative")).context_examples()


def test_oversampling_negatives(data_dir):
    g = GritBatches(cfg(data_dir, group_size=4))
    b = g.local_batch(0)
    assert b["passage_ids"].shape[0] == 16  # 1 positive + 3 negatives, oversampled if needed


def test_deterministic_for_a_seed(data_dir):
    a, b = GritBatches(cfg(data_dir)), GritBatches(cfg(data_dir))
    c = GritBatches(cfg(data_dir, seed=1))
    for step in (0, 3, 7):
        for k, v in a.local_batch(step).items():
            np.testing.assert_array_equal(v, b.local_batch(step)[k])
    assert any(not np.array_equal(a.local_batch(s)["query_ids"], c.local_batch(s)["query_ids"])
               for s in range(3))


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_disjoint_and_cover_the_global_batch(data_dir, count):
    full = GritBatches(cfg(data_dir, query_batch=4, generative_batch=4), process_index=0,
                       process_count=1)
    parts = [GritBatches(cfg(data_dir), process_index=p, process_count=count) for p in range(count)]
    for step in range(full.emb_steps):
        whole = full.local_batch(step)
        lengths = {k.split("_")[0]: v.shape[1] for k, v in whole.items()}
        pieces = [pad_to(p.local_batch(step), lengths, full.pad_id) for p in parts]
        for k, v in whole.items():
            np.testing.assert_array_equal(np.concatenate([pc[k] for pc in pieces]), v)
        rows = [x for p in parts for x in p._local(p.embedding_plan(0)[step])]
        assert len(rows) == len(set(rows)) == 4


def test_resume_mid_epoch_and_across_epochs(data_dir, tmp_path):
    g = GritBatches(cfg(data_dir))
    it = g.iterator()
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    ckpt = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    ckpt.save(str(tmp_path / "data_state"), state)
    rest = [next(it) for _ in range(5)]  # crosses into the second epoch (5 steps per epoch)
    restored = ckpt.restore(str(tmp_path / "data_state"))
    it2 = GritBatches(cfg(data_dir)).iterator()
    it2.set_state(restored)
    again = [next(it2) for _ in range(5)]
    for x, y in zip(rest, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    uninterrupted = GritBatches(cfg(data_dir)).iterator()
    for x in first + rest:
        y = next(uninterrupted)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _per_dataset(g, epoch):
    """(dataset -> indices drawn this epoch) of the embedding and generative plans."""
    out = {}
    for names, plan in ((g.emb_names, g.embedding_plan(epoch)), (g.gen_names,
                                                                 g.generative_plan(epoch))):
        for batch in plan:
            for d, i in batch:
                out.setdefault(names[d], []).append(i)
    return out


def test_default_mixture_is_every_example_once(data_dir):
    g = GritBatches(cfg(data_dir))
    assert g.counts == {"a": 10, "b": 7, "c": 5, "gen": 9}
    assert "mixture per epoch: a.jsonl 10 of 10, 45%; b.jsonl 7 of 7, 32%; c.jsonl 5 of 5, 23%; "\
           "gen.jsonl 9 of 9, 100%" in g.summary()


def test_mixture_counts_multiples_and_cap(data_dir):
    g = GritBatches(cfg(data_dir, mixture="a=4, b.jsonl=2x, c=0, gen=1.5x", max_per_dataset=6))
    # a: 4 of its capped 6; b: 2 x 6 (capped from 7); c: left out; gen: 1.5 x its capped 6.
    assert g.counts == {"a": 4, "b": 12, "c": 0, "gen": 9}
    assert "a.jsonl 4 of 10 (cap 6), 25%; b.jsonl 12 of 7 (cap 6), 75%; c.jsonl 0 of 5, 0%" \
        in g.mixture_summary()
    pools = {n: set(g._pool(n).tolist()) for n in ("a", "b")}
    assert len(pools["a"]) == len(pools["b"]) == 6
    for epoch in range(2):
        drawn = {n: [] for n in ("a", "b", "c", "gen")}
        for n, idx in _per_dataset(g, epoch).items():
            drawn[n] += idx
        dropped = g.emb_dropped
        assert len(drawn["a"]) + len(drawn["b"]) == 16 - dropped and not drawn["c"]
        assert set(drawn["a"]) <= pools["a"] and len(set(drawn["a"])) == len(drawn["a"])
        # b twice over: every pool member at most twice, drawn in two fresh shuffles.
        assert set(drawn["b"]) <= pools["b"] and max(drawn["b"].count(i) for i in pools["b"]) <= 2
        assert len(drawn["gen"]) == 8  # 9 per epoch: two batches of 4, one left out
        assert set(drawn["gen"]) <= set(g._pool("gen").tolist())
    assert (g.emb_steps, g.gen_steps, g.gen_dropped) == (4, 2, 1)


def test_mixture_is_deterministic_resumable_and_seeded(data_dir):
    kw = dict(mixture="a=3x,b=2", max_per_dataset=5)
    a, b = GritBatches(cfg(data_dir, **kw)), GritBatches(cfg(data_dir, **kw))
    for epoch in range(3):
        assert a.embedding_plan(epoch) == b.embedding_plan(epoch)
    assert a.embedding_plan(0) != a.embedding_plan(1)
    assert _per_dataset(a, 0)["a"] != _per_dataset(a, 1)["a"]  # fresh shuffles per epoch
    c = GritBatches(cfg(data_dir, seed=1, **kw))
    assert set(c._pool("a").tolist()) != set(a._pool("a").tolist())
    for step in (0, 5, 11):  # any step is a pure function of (config, step)
        for k, v in a.local_batch(step).items():
            np.testing.assert_array_equal(v, b.local_batch(step)[k])


@pytest.mark.parametrize("spec, error", [
    ("nope=3", "entry 'nope=3': expected name=count .* one of \\['a', 'b', 'c', 'gen'\\]"),
    ("a", "entry 'a': expected name=count"),
    ("a=-1", "the value must be a count >= 0 or a multiple like 0.5x"),
    ("a=lots", "the value must be a count"),
    ("a=1,a.jsonl=2", "names a twice")])
def test_bad_mixture_is_named(data_dir, spec, error):
    with pytest.raises(ValueError, match=error):
        GritBatches(cfg(data_dir, mixture=spec))


def test_global_batch_on_a_mesh(data_dir):
    g = GritBatches(cfg(data_dir, query_batch=8, generative_batch=8, group_size=1))
    local = g.local_batch(0)
    mesh = sharding.make_mesh((2, 4, 1))
    arrays = global_batch(local, sharding.batch_sharding(mesh), g.pad_id)
    for k, v in local.items():
        assert arrays[k].shape == v.shape
        assert arrays[k].sharding.spec[0] == sharding.BATCH_AXES == ("data", "fsdp", "expert")
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_invalid_pipeline_configs(data_dir, tmp_path):
    with pytest.raises(ValueError, match="query_batch=3 must be a positive multiple of the "
                                         "process count \\(2\\)"):
        GritBatches(cfg(data_dir, query_batch=3), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GritBatches(cfg(data_dir, query_batch=64))
    with pytest.raises(ValueError, match="mode"):
        GritBatches(cfg(data_dir, mode="both"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "noneg.jsonl").write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    build(str(src), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="noneg.jsonl\\) has records without hard negatives"):
        GritBatches(cfg(str(tmp_path / "o"), query_batch=1, mode="embedding"))
    g = GritBatches(cfg(str(tmp_path / "o"), query_batch=1, group_size=1, mode="embedding"))
    assert set(g.local_batch(0)) == {"query_ids", "query_valid", "query_pool", "passage_ids",
                                     "passage_valid", "passage_pool"}
    with pytest.raises(ValueError, match="needs generative data"):
        GritBatches(cfg(str(tmp_path / "o"), query_batch=1, group_size=1))


def test_two_processes_build_the_global_batch(data_dir, tmp_path):
    """Two jax.distributed processes over loopback: their local parts form the global batch."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_data_worker", str(port),
                               str(i), data_dir, str(tmp_path / f"ok{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)  # jax catches SIGTERM after initialize
                p.wait(timeout=10)
    for i, p in enumerate(procs):
        assert p.returncode == 0, outs[i][-3000:]
        assert (tmp_path / f"ok{i}").read_text() == "ok"
