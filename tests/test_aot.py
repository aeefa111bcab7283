"""Ahead-of-time compilation of the real train step for a TPU topology (libtpu, no TPU needed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# libtpu allows one process at a time (a lock file), so only the compiling subprocesses load it:
# the Makefile installs it outside site-packages and they find it through TPU_LIBRARY_PATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(ROOT, ".venv", "libtpu", "libtpu", "libtpu.so")
HAVE_LIBTPU = os.path.exists(LIBTPU) or importlib.util.find_spec("libtpu") is not None
pytestmark = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (make venv "
                                "puts it in .venv/libtpu; or pip install 'grit_jax[tpu]')")


def env():
    """The test environment without JAX_PLATFORMS=cpu; grit_jax.aot finds .venv/libtpu itself."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}


def run_script(code: str, *args, timeout=600):
    """Python code in a fresh process that may load libtpu."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(*args, tmp_path, config="configs/tiny.py", topology="v5p:2x2x2"):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "grit_jax.aot", "--config", config,
                           "--topology", topology, "--lengths", "64,128,128",
                           "--json", str(out), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env())
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_tiny_config_compiles_for_v5p(tmp_path):
    """The README command shape, with nothing set by the user (libtpu found in .venv/libtpu):
    the real step with GradCache and splash attention compiles for a v5p slice."""
    proc, r = run("--config.loss.grad_cache_chunk=8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["chips"] == r["devices"] == 8 and r["device_kind"] == "TPU v5"
    assert r["attention_impl"] == "splash" and r["remat_policy"] == "none"
    assert r["hlo"]["kernel_flops_by_source"]["analytic_attention"] > 0
    assert 0 < r["setup_per_device_gib"]["random_init"] < r["per_device_gib"]["total"]
    assert r["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1} and r["fits"]
    m = r["per_device_gib"]
    assert 0 < m["arguments"] < m["total"] <= m["hbm"] == 95
    assert r["batch"] == {"query_ids": [8, 64], "passage_ids": [16, 128], "gen_ids": [8, 128]}
    assert "fits" in proc.stdout and "implied MFU" in proc.stdout
    # Loops counted by their trip counts: the scanned layers (4) and GradCache chunks (1 query
    # chunk of 8, 2 passage chunks of 8) all resolved; the compiled matmul FLOPs cover the model's
    # (6 x params x tokens + attention) plus the recompute that remat of the LM head and GradCache's
    # extra embedding forward add, and nowhere near XLA's count of each loop body once.
    h = r["hlo"]
    assert h["unresolved_loops"] == 0 and 4 in h["loop_trips"] and 2 in h["loop_trips"]
    assert 1.0 < r["hlo_flops_over_model"] < 1.8, r["hlo_flops_over_model"]
    assert h["flops"] > 1.2 * r["xla_cost_analysis"]["flops"]
    assert h["collective_bytes"] > 0 and h["bytes"] > 0
    e, u = r["estimated_step_s"], r["implied_mfu"]
    assert r["roofline_step_s"] < e["overlapped"] <= e["serial"]
    assert 0 < u["serial"] <= u["overlapped"] < 1


def test_mixture_of_experts_compiles_with_megablox_and_expert_parallelism(tmp_path):
    """tiny_moe on v5p:2x2x2 with 4 experts per device pair: the Pallas grouped matmuls inside
    the expert-parallel shard_map compile for the TPU and their FLOPs are counted."""
    proc, r = run("--config.mesh.expert=2", tmp_path=tmp_path, config="configs/tiny_moe.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "expert": 2, "tensor": 1} and r["fits"]
    assert r["active_params"] < r["params"] and "active per token" in proc.stdout
    h = r["hlo"]
    assert h["unresolved_loops"] == 0 and 0 < h["kernel_flops"] < h["flops"]
    assert r["hlo_flops_over_model"] > 1.0


def test_qlora_step_compiles_for_v5e_with_less_argument_memory(tmp_path):
    """LoRA on every projection over an nf4 base (4-bit codes, block scales), with PrefixLM,
    one-sided gradients and micro-batches of both sides, compiles for a v5e slice; the arguments
    (params + Adam state) per device are well under the full finetune's (adapters alone carry
    Adam moments)."""
    common = ("--config.model.hidden_size=512", "--config.model.intermediate_size=1024",
              "--config.model.num_heads=8")
    for d in ("full", "lora"):
        (tmp_path / d).mkdir()
    full, rf = run(*common, tmp_path=tmp_path / "full", topology="v5e:2x2")
    lora, rl = run(*common, "--config.model.lora_rank=8", "--config.model.base_quant=nf4",
                   "--config.model.lora_targets=q,k,v,o,gate,up,down",
                   "--config.loss.gen_attention=prefix", "--config.loss.emb_grad=query",
                   "--config.loss.gen_micro_batches=2", "--config.loss.emb_micro_batches=2",
                   tmp_path=tmp_path / "lora", topology="v5e:2x2")
    assert full.returncode == 0 and lora.returncode == 0, lora.stderr[-2000:]
    assert rl["fits"] and rl["device_kind"] == rf["device_kind"]
    assert rl["per_device_gib"]["arguments"] < 0.5 * rf["per_device_gib"]["arguments"]


def test_too_big_exits_1_with_advice(tmp_path):
    # 64 queries x 16 passages of 2048 tokens without GradCache or remat: far beyond 95 GiB.
    proc, r = run("--lengths", "2048,2048,2048", "--config.data.query_batch=64",
                  "--config.data.group_size=16", "--config.model.hidden_size=1024",
                  "--config.model.intermediate_size=4096", "--config.model.num_heads=8",
                  "--config.model.num_layers=8", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not r["fits"] and "DOES NOT FIT" in proc.stdout
    assert r["needed_gib"] > r["hbm_gib"] > 90
    assert "remat_policy=full" in proc.stdout and "grad_cache_chunk" in proc.stdout


def test_bad_topology_and_config_exit_2(tmp_path):
    proc, _ = run("--topology", "v5p:9x9x9", tmp_path=tmp_path)
    assert proc.returncode == 2 and "cannot describe TPU topology 'v5p:9x9x9'" in proc.stderr
    proc, _ = run("--config.data.query_batch=3", tmp_path=tmp_path)
    assert proc.returncode == 2 and "data.query_batch=3 is not divisible" in proc.stderr


SPLASH = """
import json, sys
import jax, jax.numpy as jnp
from grit_jax import aot, attention
from grit_jax.aot import cost as hlo_cost

b, t, h, g, d = 2, 1024, 4, 2, 128
out = {}
for topology in ("v5e:2x2", "v6e:2x2"):  # the kernel compiles for these chips too
    one = jax.sharding.SingleDeviceSharding(aot.topology_devices(topology)[0])
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=one)
    kv = jax.ShapeDtypeStruct((b, t, g, d), jnp.bfloat16, sharding=one)
    valid = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=one)
    f = lambda q, k, v, m: attention.splash_attention(q, k, v, attention.SelfMask(m, "causal"), 1.0)
    out[topology] = "tpu_custom_call" in jax.jit(f).lower(q, kv, kv, valid).compile().as_text()
devices = aot.topology_devices("v5p:2x2x1")
one = jax.sharding.SingleDeviceSharding(devices[0])
spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)
valid = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=one)
for mode in ("causal", "bidirectional"):
    def loss(q, k, v, valid):
        o = attention.splash_attention(q, k, v, attention.SelfMask(valid, mode), 0.1)
        return jnp.sum(o.astype(jnp.float32))
    for name, fn in (("fwd", loss), ("grad", jax.grad(loss, argnums=(0, 1, 2)))):
        text = jax.jit(fn).lower(spec(b, t, h, d), spec(b, t, g, d), spec(b, t, g, d),
                                 valid).compile().as_text()
        out[mode + "_" + name] = hlo_cost.analyze(text)["kernel_flops_by_source"]
print(json.dumps(out))
"""


def test_splash_kernels_are_priced_by_the_blocks_their_mask_leaves():
    """Splash carries no cost estimate: hlo_cost counts 2 FLOPs per multiply-add over the
    (query block, key block) pairs the mask leaves (block 512 at 1024 tokens: causal 3 of 4),
    per phase (forward q k^T and p v; dq 3 products; dkv 4), checked by hand here."""
    r = run_script(SPLASH)
    assert r["v5e:2x2"] and r["v6e:2x2"]
    b, h, d, blk = 2, 4, 128, 512
    per_block = 2 * b * h * blk * blk * d  # FLOPs of one multiply-add pass over one block pair
    for mode, blocks in (("causal", 3), ("bidirectional", 4)):
        assert r[f"{mode}_fwd"] == {"analytic_attention": 2 * per_block * blocks}
        # The gradient program recomputes the forward (with residuals), then dq and dkv.
        assert r[f"{mode}_grad"] == {"analytic_attention": (2 + 3 + 4) * per_block * blocks}


KINDS = """
import json
from grit_jax import aot, hardware
out = {}
for topo in ("v4:2x2x1", "v5p:2x2x1", "v5e:2x2", "v6e:2x2"):
    kind = aot.topology_devices(topo)[0].device_kind
    out[topo] = [kind, hardware.require_chip(kind).name]
print(json.dumps(out))
"""


def test_every_tpu_generation_reports_a_kind_in_the_chip_table():
    assert run_script(KINDS) == {"v4:2x2x1": ["TPU v4", "v4"], "v5p:2x2x1": ["TPU v5", "v5p"],
                                 "v5e:2x2": ["TPU v5 lite", "v5e"],
                                 "v6e:2x2": ["TPU v6 lite", "v6e"]}


def test_two_slices_reduce_gradients_across_the_dcn_once_per_step(tmp_path):
    """Two v5p slices with a data axis across them (dcn_mesh.data=2) and GradCache: in-batch
    negatives span both slices, and the gradients cross the data-centre network once per step
    (each data group sums its chunks first, train_step.per_group), not once per chunk."""
    proc, r = run("--slices", "2", "--config.dcn_mesh.data=2", "--config.loss.grad_cache_chunk=8",
                  tmp_path=tmp_path, topology="v5p:2x2x1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["slices"] == 2 and r["devices"] == 8
    assert r["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert max(r["hlo"]["loop_trips"]) > 1  # GradCache chunks and layers do loop
    dcn = r["hlo"]["dcn_collectives"]
    assert dcn and all(c["runs_per_step"] == 1 for c in dcn), dcn
    # A ring all-reduce over 2 slices sends each device's parameter shard once (+ the reps of
    # the in-batch negatives and a few scalars).
    assert 0.9 < r["dcn_bytes_over_params"] < 1.5, r["dcn_bytes_over_params"]
    assert "over DCN" in proc.stdout
