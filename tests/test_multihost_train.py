"""Multi-process training on this CPU: 2 processes x 4 fake devices over jax.distributed (gloo).

The per-step losses equal a one-process run of the same config, and a killed peer makes the
survivor exit with an error within a bounded time instead of hanging.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_train import SMALL, data_dir, finish, losses  # noqa: F401 (data_dir: fixture)

STEPS = ["--config.total_steps=4", "--config.checkpoint_every=2",
         "--config.data.query_batch=8", "--config.data.generative_batch=8"]
ROOT = os.path.dirname(os.path.dirname(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, data, devices, *extra, process=None, port=None):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "grit_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), f"--config.data.data_dir={data}", *SMALL, *STEPS, *extra]
    if process is not None:
        cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                f"--process_id={process}", "--heartbeat_timeout=10"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT)


def wait_for_steps(metrics, procs, n, timeout=300):
    """Until process 0 has logged n steps; fails (killing both) if a process dies or time runs out."""
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().count("\n") >= n):
        if time.time() - t0 > timeout or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("training did not start: " + finish(procs[0], 10)[1][-3000:])
        time.sleep(0.2)


def test_two_processes_equal_one(tmp_path, data_dir):  # noqa: F811
    port = free_port()
    procs = [start(tmp_path / "multi", data_dir, 4, process=i, port=port) for i in range(2)]
    results = [finish(p, timeout=600) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert "on 8 cpu devices" in results[0][1] and "step 4:" in results[0][1]
    assert "step 4:" not in results[1][1]  # progress and metrics come from process 0 only
    rc, out = finish(start(tmp_path / "single", data_dir, 1))
    assert rc == 0, out[-3000:]
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        for key in ("loss", "loss_rep", "loss_gen", "grad_norm", "lr"):
            assert multi[step][key] == pytest.approx(single[step][key], rel=1e-5, abs=1e-6), \
                (step, key)
    assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")


def test_killed_peer_stops_the_survivor(tmp_path, data_dir):  # noqa: F811
    port = free_port()
    procs = [start(tmp_path / "w", data_dir, 4, "--config.total_steps=400",
                   "--config.checkpoint_every=1000", process=i, port=port) for i in range(2)]
    wait_for_steps(tmp_path / "w" / "metrics.jsonl", procs, 2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        procs[0].wait(timeout=180)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer was killed")
    assert procs[0].returncode != 0
    print(f"survivor exited {procs[0].returncode} {time.time() - t_kill:.1f}s after the kill")


def test_sigterm_on_one_host_stops_both_at_one_step_and_resume(tmp_path, data_dir):  # noqa: F811
    port = free_port()
    extra = ("--config.total_steps=12", "--config.checkpoint_every=1000")
    procs = [start(tmp_path / "w", data_dir, 4, *extra, process=i, port=port) for i in range(2)]
    wait_for_steps(tmp_path / "w" / "metrics.jsonl", procs, 2)
    procs[1].send_signal(signal.SIGTERM)  # preemption notice on one host only
    results = [finish(p, timeout=180) for p in procs]
    saved = []
    for rc, out in results:
        assert rc == 0, out[-3000:]
        saved.append(int(out.split("saved step ")[1].split(",")[0]))
    assert saved[0] == saved[1] < 12 and "signal on another process" in results[0][1]
    assert os.path.isdir(tmp_path / "w" / "checkpoints" / str(saved[0]))
    # Restarting both resumes from that step and finishes.
    port = free_port()
    procs = [start(tmp_path / "w", data_dir, 4, *extra, process=i, port=port) for i in range(2)]
    results = [finish(p, timeout=600) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert f"resumed from step {saved[0]}" in results[0][1]
    assert max(losses(tmp_path / "w")) == 12
