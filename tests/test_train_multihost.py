"""Multi-host training on this CPU: 2 processes x 4 fake devices over jax.distributed (gloo).

Pods are stood in for by local processes: every process reads only its own shards of the
initial weights and its own rows of each batch, process 0 writes the shared files, a SIGTERM on
one host stops both at one step with a checkpoint (in a gs:// workdir on a local GCS emulator),
and a killed peer stops the survivor instead of hanging. Two processes as two slices (a DCN data
axis) equal one process too.

Equality across meshes and processes is checked in float64 (JAX_ENABLE_X64; the model computes
norms, RoPE, attention and logits in float64 then), where changing the order of a reduction moves
a result by a few units of 2^-52 relative: the bound used, 1e-9 relative, leaves a factor of
10^6 for the amplification by the contrastive temperature (1/0.02) and three Adam steps, and is
still eight orders of magnitude below a float32 difference. It holds on any machine.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from grit_jax.convert.hf import hf_to_grit
from tests import hf_models
from tests.test_train import SMALL, finish, losses

STEPS = ["--config.total_steps=4", "--config.checkpoint_every=2",
         "--config.data.query_batch=8", "--config.data.generative_batch=8"]
FLOAT64 = ["--config.model.dtype=float64", "--config.model.param_dtype=float64"]
KEYS = ("loss", "loss_rep", "loss_gen", "grad_norm", "lr")
ROOT = os.path.dirname(os.path.dirname(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, data, devices, *extra, process=None, port=None, env=None, x64=False):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **(env or {}))
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    cmd = [sys.executable, "-m", "grit_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), f"--config.data.data_dir={data}", *SMALL, *STEPS, *extra]
    if process is not None:
        cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                f"--process_id={process}", "--heartbeat_timeout=10"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT)


def pair(workdir, data, *extra, **kw):
    """Both processes of a 2-process run."""
    port = free_port()
    return [start(workdir, data, 4, *extra, process=i, port=port, **kw) for i in range(2)]


def wait_for_steps(read_metrics, procs, n, timeout=300):
    """Until process 0 has logged n steps; fails (killing both) if a process dies or time runs
    out. ``read_metrics()``: the metrics text so far ("" before the file exists)."""
    t0 = time.time()
    while read_metrics().count("\n") < n:
        if time.time() - t0 > timeout or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("training did not start: " + finish(procs[0], 10)[1][-3000:])
        time.sleep(0.5)


def assert_equal_runs(got, want, what):
    assert sorted(got) == sorted(want), what
    for step in want:
        for key in KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-9, abs=1e-12), \
                (what, step, key, got[step][key], want[step][key])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The initial weights two ways: an HF directory in several safetensors shards, and the
    params directory hf-to-grit makes of it on one device (as on a workstation)."""
    root = tmp_path_factory.mktemp("pretrained")
    model = hf_models.build("mistral", seed=5)
    model.save_pretrained(str(root / "hf"), max_shard_size="2MB")
    hf_models.write_tokenizer(str(root / "hf"))
    hf_to_grit(str(root / "hf"), str(root / "params"))
    return str(root / "hf"), str(root / "params")


def test_two_processes_and_two_slices_equal_one(tmp_path, data_dir, pretrained):
    """From a converted params directory on an FSDP mesh over both processes, and from the HF
    shards with the processes as two slices (DCN data axis) and GradCache: step for step the
    single-process run, in float64."""
    hf, params = pretrained
    fsdp = pair(tmp_path / "fsdp", data_dir, f"--config.init_from={params}", *FLOAT64, x64=True)
    slices = pair(tmp_path / "slices", data_dir, f"--config.init_from={hf}", *FLOAT64,
                  "--config.dcn_mesh.data=2", "--config.loss.grad_cache_chunk=8", x64=True)
    results = [finish(p, timeout=900) for p in fsdp + slices]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert "on 8 cpu devices (2 processes)" in results[0][1] and "step 4:" in results[0][1]
    assert "step 4:" not in results[1][1]  # progress and metrics come from process 0 only
    assert "mesh {'data': 2, 'fsdp': 4" in results[2][1]
    assert f"initialised from {hf}" in results[2][1]
    rc, out = finish(start(tmp_path / "one", data_dir, 1, f"--config.init_from={hf}", *FLOAT64,
                           x64=True), timeout=900)
    assert rc == 0, out[-3000:]
    one = losses(tmp_path / "one")
    assert sorted(one) == [1, 2, 3, 4]
    assert_equal_runs(losses(tmp_path / "fsdp"), one, "2 processes, FSDP, params dir")
    assert_equal_runs(losses(tmp_path / "slices"), one, "2 slices, GradCache, HF shards")
    # Only process 0 wrote the workdir's shared files; both processes wrote checkpoint shards.
    for run in ("fsdp", "slices"):
        assert os.path.isdir(tmp_path / run / "checkpoints" / "4")
        assert (tmp_path / run / "grit_config.json").exists()


def test_killed_peer_stops_the_survivor(tmp_path, data_dir):
    procs = pair(tmp_path / "w", data_dir, "--config.total_steps=400",
                 "--config.checkpoint_every=1000")
    metrics = tmp_path / "w" / "metrics.jsonl"
    wait_for_steps(lambda: metrics.read_text() if metrics.exists() else "", procs, 2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        procs[0].wait(timeout=180)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer was killed")
    assert procs[0].returncode != 0
    print(f"survivor exited {procs[0].returncode} {time.time() - t_kill:.1f}s after the kill")


def gcs_text(env, url):
    """A text object through the emulator ("" if absent), read in a subprocess with its env."""
    code = ("import sys; from etils import epath; p = epath.Path(sys.argv[1]); "
            "print(p.read_text() if p.exists() else '', end='')")
    out = subprocess.run([sys.executable, "-c", code, url], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def gcs_exists(env, url) -> bool:
    """Whether an object (or prefix) exists in the emulator."""
    code = "import sys; from etils import epath; print(epath.Path(sys.argv[1]).exists())"
    out = subprocess.run([sys.executable, "-c", code, url], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() == "True"


def gcs_losses(env, workdir):
    import json

    rows = {}
    for line in gcs_text(env, f"{workdir}/metrics.jsonl").splitlines():
        r = json.loads(line)
        rows[r["step"]] = r
    return rows


def test_sigterm_on_one_host_saves_to_gcs_and_both_resume(tmp_path, data_dir, gcs):
    """A gs:// workdir: SIGTERM on one host stops both at one step with a checkpoint written
    straight to the bucket; restarting both resumes there and finishes; a time-based checkpoint
    interval saves too."""
    workdir = "gs://grit-test/sigterm"
    extra = ("--config.total_steps=12", "--config.checkpoint_every=1000",
             "--config.checkpoint_every_minutes=0.001")
    procs = pair(workdir, data_dir, *extra, env=gcs)
    wait_for_steps(lambda: gcs_text(gcs, f"{workdir}/metrics.jsonl"), procs, 2)
    procs[1].send_signal(signal.SIGTERM)  # preemption notice on one host only
    results = [finish(p, timeout=300) for p in procs]
    assert results[0][0] == 0, results[0][1][-3000:]
    assert results[1][0] == 0, results[1][1][-3000:]
    saved = int(results[0][1].split("saved step ")[1].split(",")[0])
    assert saved < 12 and "signal on another process" in results[0][1]
    # Orbax commits a step on GCS with a marker object, not a directory rename.
    assert gcs_exists(gcs, f"{workdir}/checkpoints/{saved}/commit_success.txt")
    procs = pair(workdir, data_dir, *extra, env=gcs)
    results = [finish(p, timeout=900) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert f"resumed from step {saved}" in results[0][1]
    assert max(gcs_losses(gcs, workdir)) == 12
