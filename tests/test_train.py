"""`python -m grit_jax.train`: resume after SIGKILL reproduces the uninterrupted run, SIGTERM saves,
bad configs fail before compiling, NaN stops the run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SMALL = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
         "--config.model.num_layers=1", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.data.query_batch=4",
         "--config.data.generative_batch=4", "--config.data.num_threads=0",
         "--config.log_every=1", "--config.checkpoint_every=4", "--config.total_steps=16"]


def launch(workdir, data_dir, *extra, config="configs/tiny.py", env=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", **(env or {}))
    cmd = [sys.executable, "-m", "grit_jax.train", "--config", config,
           "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *SMALL, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.dirname(__file__)))


def finish(proc, timeout=400):
    try:
        out = proc.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def losses(workdir):
    """step -> metrics, the last logged occurrence winning (a resumed run re-logs steps)."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    return rows


def wait_for_steps(workdir, n, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0].decode()[-3000:])
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} steps within {timeout}s")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_kill_and_resume_equals_uninterrupted(where, tmp_path, data_dir, request):
    """SIGKILL mid-run, restart: the resumed run logs exactly the uninterrupted run's metrics,
    in a local workdir and in a gs:// one (checkpoints written to the bucket directly, on a
    local GCS emulator). The restart reuses the persistent compilation cache. The local run
    accumulates both sides over two micro-batches (the state is the same; resume must be too)."""
    from tests.test_train_multihost import gcs_losses

    env = request.getfixturevalue("gcs") if where == "gs" else {}
    root = f"gs://grit-test/resume-{tmp_path.name}" if where == "gs" else str(tmp_path)
    read = (lambda w: gcs_losses(env, w)) if where == "gs" else losses
    steps = ["--config.total_steps=10", "--config.checkpoint_every=3"]
    if where == "local":
        steps += ["--config.loss.gen_micro_batches=2", "--config.loss.emb_micro_batches=2"]
    rc, out = finish(launch(f"{root}/a", data_dir, *steps, env=env))
    assert rc == 0, out[-3000:]
    full = read(f"{root}/a")
    assert sorted(full) == list(range(1, 11))
    proc = launch(f"{root}/b", data_dir, *steps, env=env)
    for line in proc.stdout:  # its progress lines, as they come: kill it after step 7
        if line.startswith(b"step 7:"):
            break
    else:
        raise AssertionError(f"run b ended before step 7 (exit {proc.wait()})")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rc, out = finish(launch(f"{root}/b", data_dir, *steps, env=env))
    assert rc == 0 and "resumed from step" in out, out[-3000:]
    assert "(from the persistent cache" in out  # the killed run compiled these programs
    resumed = read(f"{root}/b")
    assert sorted(resumed) == sorted(full)
    for step, row in full.items():
        for k in ("loss", "loss_rep", "loss_gen", "grad_norm", "lr"):
            assert resumed[step][k] == pytest.approx(row[k], rel=1e-6, abs=1e-7), (step, k)
    assert full[10]["loss_rep"] < full[1]["loss_rep"]


def test_mixture_of_experts_trains_and_resumes(tmp_path, data_dir):
    moe = dict(config="configs/tiny_moe.py")
    rc, out = finish(launch(tmp_path / "m", data_dir, "--config.total_steps=4", **moe))
    assert rc == 0, out[-3000:]
    rc, out = finish(launch(tmp_path / "m", data_dir, "--config.total_steps=6", **moe))
    assert rc == 0 and "resumed from step 4" in out, out[-3000:]
    rows = losses(tmp_path / "m")
    assert sorted(rows) == list(range(1, 7))
    for row in rows.values():
        assert row["loss_aux"] >= 2.0 - 1e-4  # top-2 balancing loss: 2 when perfectly balanced
        assert sum(row[f"expert_frac_{i}"] for i in range(8)) == pytest.approx(1.0, abs=1e-5)
        assert row["loss"] == pytest.approx(row["loss_rep"] + row["loss_gen"]
                                            + 0.02 * row["loss_aux"], rel=1e-5)


def test_sigterm_saves_and_exits(tmp_path, data_dir):
    proc = launch(tmp_path / "c", data_dir, "--config.total_steps=400",
                  "--config.checkpoint_every=1000")
    wait_for_steps(tmp_path / "c", 3, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, timeout=120)
    assert rc == 0 and "saved step" in out, out[-3000:]
    saved = [d for d in os.listdir(tmp_path / "c" / "checkpoints") if d.isdigit()]
    assert saved and int(saved[0]) >= 3


def test_bad_config_fails_before_compiling(tmp_path, data_dir):
    rc, out = finish(launch(tmp_path / "d", data_dir, "--config.data.query_batch=0"))
    assert rc == 2 and "data.query_batch=0 must be > 0" in out
    rc, out = finish(launch(tmp_path / "e", data_dir, "--config.no_such_key=1"))
    assert rc != 0 and "no_such_key" in out
    rc, out = finish(launch(tmp_path / "f", data_dir, "--config.mesh.data=3"))
    assert rc == 2 and "mesh shape [3, -1, 1, 1]" in out
    rc, out = finish(launch(tmp_path / "g", data_dir, "--config.model.attention_impl=splash"))
    assert rc == 2 and "attention_impl='splash' needs a TPU" in out
    rc, out = finish(launch(tmp_path / "h", data_dir, "--config.loss.gen_micro_batches=3"))
    assert rc == 2 and "loss.gen_micro_batches=3 must split data.generative_batch=4" in out
    assert not (tmp_path / "g").exists()  # refused before anything was written


def test_workdir_of_another_model_is_refused_untouched(tmp_path, data_dir):
    """A run whose model differs from the workdir's stops before writing anything; execution
    knobs (remat, attention kernel, dtype) may change between runs of one workdir."""
    rc, out = finish(launch(tmp_path / "w", data_dir, "--config.total_steps=2"))
    assert rc == 0, out[-2000:]
    before = {p: p.read_bytes() for p in (tmp_path / "w").glob("*.json*")}
    rc, out = finish(launch(tmp_path / "w", data_dir, "--config.total_steps=4",
                            "--config.model.num_layers=2"))
    assert rc == 2 and ("this workdir holds a different model (num_layers: 1 vs 2"
                        in out), out[-2000:]
    assert {p: p.read_bytes() for p in (tmp_path / "w").glob("*.json*")} == before
    rc, out = finish(launch(tmp_path / "w", data_dir, "--config.total_steps=4",
                            "--config.model.remat_policy=full"))
    assert rc == 0 and "resumed from step 2" in out, out[-2000:]


def test_nan_stops_without_checkpoint(tmp_path, data_dir):
    rc, out = finish(launch(tmp_path / "g", data_dir, "--config.optim.lr=1e30",
                            "--config.optim.clip_norm=1e30"))
    assert rc == 2 and "not finite" in out and "stopping without checkpointing" in out, out[-2000:]
    ckpts = tmp_path / "g" / "checkpoints"
    bad_step = int(out.split("error: step ")[1].split(":")[0])
    saved = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
    assert all(s < bad_step for s in saved)


def test_export_workdir_and_use_it(tmp_path, data_dir):
    """A trained workdir exports to Hugging Face format (transformers reloads it) and embeds."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from grit_jax.convert.__main__ import main as convert_main
    from grit_jax.inference import GritLM

    rc, out = finish(launch(tmp_path / "w", data_dir, "--config.total_steps=4"))
    assert rc == 0, out[-2000:]
    assert convert_main(["grit-to-hf", "--workdir", str(tmp_path / "w"), "--out",
                         str(tmp_path / "hf")]) == 0
    assert os.path.exists(tmp_path / "hf" / "tokenizer.model")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours = GritLM.from_pretrained(str(tmp_path / "w"))
    ref = GritLM.from_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(ours.encode(["query number 1"]), ref.encode(["query number 1"]),
                               atol=1e-6)
    assert hf.config.num_hidden_layers == 1


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, data_dir):
    """An unfinished save (Orbax's temporary directory) is ignored: the run resumes before it."""
    rc, out = finish(launch(tmp_path / "s", data_dir, "--config.total_steps=8"))
    assert rc == 0, out[-2000:]
    partial = tmp_path / "s" / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    rc, out = finish(launch(tmp_path / "s", data_dir, "--config.total_steps=12"))
    assert rc == 0 and "resumed from step 8" in out, out[-2000:]
    assert sorted(losses(tmp_path / "s")) == list(range(1, 13))


def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, data_dir):
    """Truncated data files in the newest checkpoint: export names it, a strict run stops, a default
    run sets it aside and resumes from the newest intact one, saying so. Logs carry no Orbax
    INFO lines and no warning about healthy checkpoints."""
    from grit_jax.convert.__main__ import main as convert_main

    w = tmp_path / "w"
    rc, out = finish(launch(w, data_dir, "--config.total_steps=8"))  # keeps steps 4 and 8
    assert rc == 0, out[-2000:]
    assert "_CHECKPOINT_METADATA" not in out and "INFO" not in out, out[-3000:]
    state = w / "checkpoints" / "8" / "state"
    # Every array data file cut in half: which file holds the parameters (rather than only
    # optimizer moments, which export never reads) depends on how TensorStore grouped them.
    data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"
            and p.stat().st_size > 4096]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert convert_main(["grit-to-hf", "--workdir", str(w), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    rc, out = finish(launch(w, data_dir, "--config.total_steps=12", "--config.strict_resume=True"))
    assert rc == 2 and "checkpoint step 8 is damaged" in out and "strict_resume" in out, out[-3000:]
    assert "Traceback" not in out
    rc, out = finish(launch(w, data_dir, "--config.total_steps=12"))
    assert rc == 0, out[-3000:]
    assert "checkpoint step 8 is damaged" in out and "resuming from step 4" in out, out[-3000:]
    assert "resumed from step 4" in out
    assert (w / "damaged_checkpoints" / "8" / "state").is_dir()  # kept, out of the way
    assert sorted(losses(w)) == list(range(1, 13))
    assert convert_main(["grit-to-hf", "--workdir", str(w), "--out", str(tmp_path / "hf")]) == 0
