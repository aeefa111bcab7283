"""grit_jax.trainer and train.setup: the train state is sharded from the first byte.

No device may hold an unsharded copy of a parameter (or optimizer moment) that its target
sharding splits, at any point of setup, whatever the source: a random init, a params directory,
a training workdir, a Hugging Face directory with sharded safetensors. ``ShardWatch`` checks
every way an array reaches a device (device_put, make_array_from_callback, make_array_from_single
_device_arrays, jitted outputs) and polls the live arrays; the old path (build the state on one
device, then device_put it) is shown to trip it.
"""

import threading
import time
from functools import partial

import jax
import numpy as np
import pytest

from grit_jax import sharding, trainer, weights
from grit_jax.aot import cost as hlo_cost
from grit_jax.config import ModelConfig
from grit_jax.train_step import init_state
from tests import hf_models


class ShardWatch:
    """Records arrays of the watched global shapes that some device holds whole."""

    def __init__(self, shapes, monkeypatch, poll_s=0.002):
        self.shapes, self.violations = set(shapes), []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), daemon=True)
        self._patch(monkeypatch)

    def check(self, x, where):
        for leaf in jax.tree.leaves(x):
            if isinstance(leaf, jax.Array) and tuple(leaf.shape) in self.shapes:
                if any(tuple(s.data.shape) == tuple(leaf.shape) for s in leaf.addressable_shards):
                    self.violations.append((where, tuple(leaf.shape)))
        return x

    def _patch(self, mp):
        put, from_cb = jax.device_put, jax.make_array_from_callback
        from_arrays, jit = jax.make_array_from_single_device_arrays, jax.jit

        def device_put(x, *a, **k):
            return self.check(put(x, *a, **k), "device_put")

        def make_array_from_callback(shape, sh, cb, *a, **k):
            def watched(index):
                block = cb(index)
                if tuple(shape) in self.shapes and tuple(np.shape(block)) == tuple(shape):
                    self.violations.append(("callback block", tuple(shape)))
                return block
            return from_cb(shape, sh, watched, *a, **k)

        def make_array_from_single_device_arrays(shape, sh, arrays, *a, **k):
            if tuple(shape) in self.shapes and any(tuple(x.shape) == tuple(shape) for x in arrays):
                self.violations.append(("single-device arrays", tuple(shape)))
            return from_arrays(shape, sh, arrays, *a, **k)

        def watched_jit(fn, *a, **k):
            compiled = jit(fn, *a, **k)

            def call(*args, **kw):
                return self.check(compiled(*args, **kw), "jit output")
            call.lower = compiled.lower
            return call

        mp.setattr(jax, "device_put", device_put)
        mp.setattr(jax, "make_array_from_callback", make_array_from_callback)
        mp.setattr(jax, "make_array_from_single_device_arrays",
                   make_array_from_single_device_arrays)
        mp.setattr(jax, "jit", watched_jit)

    def _poll(self, poll_s):
        while not self._stop.is_set():
            try:
                self.check(jax.live_arrays(), "live array")
            except RuntimeError:  # an array deleted while being inspected
                pass
            time.sleep(poll_s)

    def __enter__(self):
        self._poller.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._poller.join()


MESH = {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Mistral in several safetensors shards (model.safetensors.index.json)."""
    d = tmp_path_factory.mktemp("hf_sharded")
    model = hf_models.build("mistral", seed=3)
    model.save_pretrained(str(d), max_shard_size="2MB")
    hf_models.write_tokenizer(str(d))
    assert (d / "model.safetensors.index.json").exists()
    return str(d)


def setup_objects(cfg: ModelConfig):
    mesh = sharding.make_mesh(MESH)
    tx, _ = trainer.optimizer(_optim_config())
    state_sh = trainer.shardings(cfg, tx, mesh)
    split = {tuple(a.shape)
             for a, s in zip(jax.tree.leaves(trainer.abstract_state(cfg, tx, state_sh)),
                             jax.tree.leaves(state_sh))
             if s.shard_shape(a.shape) != tuple(a.shape)}
    return mesh, tx, state_sh, split


def _optim_config():
    import ml_collections

    c = ml_collections.ConfigDict()
    c.total_steps = 10
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_ratio=0.1, weight_decay=0.0,
                                             b1=0.9, b2=0.999, clip_norm=1.0))
    return c


def whole_arrays(hlo_text, shapes):
    """Instructions of a compiled (per-device) program whose result has one of these shapes."""
    comps, _ = hlo_cost.parse_module(hlo_text)
    return [(c.name, i.name) for c in comps.values() for i in c.instrs.values()
            if any(dims in shapes for _, dims in hlo_cost.shapes(i.shape))]


def assert_sharded(state, state_sh):
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.shape, leaf.sharding, sh)


def test_the_watch_catches_the_old_setup(hf_dir, monkeypatch):
    """Building the state on one device and then device_put-ting it trips the watch."""
    from grit_jax.model import init_params

    cfg = weights.read_config(hf_dir)
    mesh, tx, state_sh, split = setup_objects(cfg)
    assert split, "the test needs parameters that the mesh splits"
    with ShardWatch(split, monkeypatch) as watch:
        jax.device_put(init_state(init_params(cfg), tx), state_sh)
    assert watch.violations


def test_random_init_is_sharded_from_the_first_byte(hf_dir, monkeypatch):
    cfg = weights.read_config(hf_dir)
    mesh, tx, state_sh, split = setup_objects(cfg)
    with ShardWatch(split, monkeypatch) as watch:
        state = trainer.random_state(cfg, tx, mesh, state_sh, seed=0)
    assert not watch.violations, watch.violations[:5]
    assert_sharded(state, state_sh)
    # Inside the compiled init no device materialises a whole parameter either: no instruction
    # of the per-device program has a watched shape (it does with replicated outputs).
    key = jax.random.PRNGKey(0)
    program = trainer.init_program(cfg, tx, mesh, state_sh).lower(key).compile().as_text()
    assert not whole_arrays(program, split)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    unsharded = jax.jit(partial(trainer._random_state, model_cfg=cfg, tx=tx),
                        out_shardings=replicated).lower(key).compile().as_text()
    assert whole_arrays(unsharded, split)
    # The same numbers as an unsharded init (partitionable random numbers).
    from grit_jax.model import init_params

    one = init_params(cfg)
    np.testing.assert_array_equal(np.asarray(state["params"]["layers"]["attn"]["q"]),
                                  np.asarray(one["layers"]["attn"]["q"]))


@pytest.mark.parametrize("source", ["hf", "params", "workdir"])
def test_every_source_loads_into_its_shardings(source, hf_dir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from grit_jax.convert.hf import hf_to_grit, read_hf

    cfg = weights.read_config(hf_dir)
    mesh, tx, state_sh, split = setup_objects(cfg)
    # Reference values as host (numpy) copies: no whole jax array may be alive while watching.
    if source == "hf":
        path, want = hf_dir, jax.tree.map(np.array, read_hf(hf_dir)[0])
    elif source == "params":  # converted on one device, as on a workstation
        path, want = str(tmp_path / "params"), jax.tree.map(np.array, read_hf(hf_dir)[0])
        hf_to_grit(hf_dir, path)
    else:  # a training checkpoint (state + data iterator)
        saved = trainer.random_state(cfg, tx, mesh, state_sh, seed=1)
        path, want = str(tmp_path), jax.tree.map(np.array, saved["params"])
        cfg.save(path)
        with ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                                   item_names=("state", "data")) as m:
            m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                              data=ocp.args.JsonSave({})))
            m.wait_until_finished()
        del saved
    with ShardWatch(split, monkeypatch) as watch:
        params = weights.load_params(path, cfg, state_sh["params"])
        state = trainer.state_from_params(params, tx, mesh, state_sh)
    assert not watch.violations, watch.violations[:5]
    assert_sharded(state, state_sh)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_adds_a_new_embedding_head_and_adapters(hf_dir):
    """model.projection_dim / model.lora_rank on a pretrained model without them: the body is
    read as stored, the head and the adapters start fresh (seeded; LoRA's B at zero, so the
    model is unchanged), sharded like the rest; changing a part it has is refused."""
    import flax
    import ml_collections

    from grit_jax import lora
    from grit_jax.convert.hf import read_hf

    run = ml_collections.ConfigDict({"init_from": hf_dir, "model": {
        "projection_dim": 8, "lora_rank": 2, "lora_alpha": 4.0, "lora_targets": "q,down"}})
    cfg = trainer.model_config(run)
    assert (cfg.projection_dim, cfg.lora_rank, cfg.lora_alpha) == (8, 2, 4.0)
    assert weights.read_config(hf_dir).projection_dim == 0
    mesh, tx, state_sh, _ = setup_objects(cfg)
    params = weights.load_params(hf_dir, cfg, state_sh["params"], new_params_seed=0)
    head = params.pop("projection")
    assert head["kernel"].shape == (cfg.hidden_size, 8) and float(np.abs(head["kernel"]).max()) > 0
    assert head["kernel"].sharding == state_sh["params"]["projection"]["kernel"]
    np.testing.assert_array_equal(np.asarray(head["bias"]), 0)
    flat = flax.traverse_util.flatten_dict(params)
    sh = flax.traverse_util.flatten_dict(state_sh["params"])
    adapters = sorted(p for p in flat if lora.is_adapter(p))
    assert {p[-1] for p in adapters} == {"q_lora_a", "q_lora_b", "down_lora_a", "down_lora_b"}
    for p in adapters:
        assert flat[p].sharding == sh[p]
        assert (float(np.abs(flat[p]).max()) > 0) == p[-1].endswith("_a")
    want = read_hf(hf_dir)[0]
    body = {p: v for p, v in flat.items() if not lora.is_adapter(p)}
    for p, v in flax.traverse_util.flatten_dict(want).items():
        np.testing.assert_array_equal(np.asarray(body[p]), np.asarray(v))
    stored = _with_head(hf_dir, cfg.replace(lora_rank=0), lora.merge(
        flax.traverse_util.unflatten_dict(flat), cfg)[0], head)
    with pytest.raises(ValueError, match="already has projection_dim=8"):
        trainer.model_config(ml_collections.ConfigDict(
            {"init_from": stored, "model": {"projection_dim": 4}}))


def _with_head(hf_dir, cfg, params, head):
    """A params directory of the HF model with the given head (for the refusal above)."""
    import tempfile

    from grit_jax import checkpoint

    out = tempfile.mkdtemp()
    checkpoint.save_params(jax.tree.map(np.asarray, {**params, "projection": head}), cfg, out)
    return out


def test_setup_fresh_and_resumed_under_the_watch(hf_dir, data_dir, tmp_path, monkeypatch):
    """train.setup end to end (mesh, data, workdir files, state, step) from an HF init_from,
    then again resuming the checkpoint it saved: the resume restores the checkpoint straight
    into its shardings and never reads init_from."""
    import orbax.checkpoint as ocp

    from configs import tiny
    from grit_jax import train

    config = tiny.get_config()
    config.mesh.update(MESH)
    config.init_from = hf_dir
    config.data.update(data_dir=data_dir, num_threads=0)
    cfg = weights.read_config(hf_dir)
    _, _, state_sh, split = setup_objects(cfg)
    with ShardWatch(split, monkeypatch) as watch:
        run = train.setup(config, str(tmp_path))
    assert not watch.violations, watch.violations[:5]
    assert run.origin == f"initialised from {hf_dir}"
    run.manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(run.state),
                                                data=ocp.args.JsonSave(run.iterator.get_state())))
    run.manager.wait_until_finished()
    run.manager.close()
    del run
    config.init_from = str(tmp_path / "gone")  # a resume must not touch it
    with ShardWatch(split, monkeypatch) as watch:
        run = train.setup(config, str(tmp_path))
    assert not watch.violations, watch.violations[:5]
    assert run.origin == "resumed from step 5" and run.start == 0
    assert_sharded(run.state, state_sh)
    run.manager.close()
