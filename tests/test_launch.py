"""launch/tpu.py: argument checks and the exact gcloud commands of every step (dry run)."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--name", "grit", "--zone", "us-east5-a"]


def run(*args):
    proc = subprocess.run([sys.executable, "launch/tpu.py", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_create_on_demand_and_spot():
    rc, out, _ = run("create", *BASE, "--accelerator", "v5p-128", "--dry-run")
    assert rc == 0 and out == ["gcloud compute tpus tpu-vm create grit --zone us-east5-a "
                               "--accelerator-type v5p-128 --version v2-alpha-tpuv5"]
    rc, out, _ = run("create", *BASE, "--accelerator", "v6e-64", "--spot", "--project", "p1",
                     "--dry-run")
    assert rc == 0
    assert out[0] == ("gcloud compute tpus queued-resources create grit-qr --node-id grit --zone "
                      "us-east5-a --project p1 --accelerator-type v6e-64 --runtime-version "
                      "v2-alpha-tpuv6e --spot")
    assert out[1].startswith("# repeat `gcloud compute tpus queued-resources describe grit-qr")


def test_setup_train_logs_delete():
    rc, out, _ = run("setup", *BASE, "--repo", "https://example.org/grit_jax.git", "--dry-run")
    cmd = shlex.split(out[0])
    assert rc == 0 and cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grit"]
    assert "--worker=all" in cmd and "pip install -q -e \"$HOME/grit_jax[tpu]\"" in cmd[-1]
    assert "git clone https://example.org/grit_jax.git ~/grit_jax" in cmd[-1]
    rc, out, _ = run("setup", *BASE, "--source", ".", "--mount-bucket", "my-grit", "--dry-run")
    assert rc == 0 and out[0].startswith("git -C . archive --format=tar.gz --prefix=grit_jax/")
    assert "gcsfuse --implicit-dirs my-grit /gcs/my-grit" in out[-1] and len(out) == 4
    assert out[1].startswith("gcloud compute tpus tpu-vm scp /tmp/grit-grit_jax.tar.gz")
    rc, out, _ = run("train", *BASE, "--config", "configs/gritlm_7b.py", "--workdir", "/gcs/b/r",
                     "--dry-run", "--", "--config.init_from=gs://b/mistral")
    cmd = shlex.split(out[0])
    assert rc == 0 and "--worker=all" in cmd
    assert cmd[-1] == ("cd ~/grit_jax && nohup ~/grit_jax/.venv/bin/python -m grit_jax.train "
                       "--config ~/grit_jax/configs/gritlm_7b.py --workdir /gcs/b/r "
                       "--config.init_from=gs://b/mistral > ~/grit_train.log 2>&1 &")
    rc, out, _ = run("logs", *BASE, "--worker", "3", "--dry-run")
    assert rc == 0 and "--worker=3" in out[0] and "tail -n 200 -F ~/grit_train.log" in out[0]
    rc, out, _ = run("delete", *BASE, "--spot", "--dry-run")
    assert rc == 0 and len(out) == 2 and out[1].startswith(
        "gcloud compute tpus queued-resources delete grit-qr")


def test_resume_recreates_sets_up_and_trains():
    rc, out, _ = run("resume", *BASE, "--accelerator", "v5p-128", "--spot", "--repo", "u",
                     "--config", "configs/gritlm_7b.py", "--workdir", "/gcs/b/r", "--dry-run")
    assert rc == 0
    kinds = [line.split()[3:5] if line.startswith("gcloud") else line[:8] for line in out]
    assert kinds == ["# if `gc", ["tpu-vm", "delete"], ["queued-resources", "delete"],
                     ["queued-resources", "create"], "# repeat", ["tpu-vm", "ssh"],
                     ["tpu-vm", "ssh"]]
    assert "grit_jax.train" in out[-1] and "/gcs/b/r" in out[-1]


def test_bad_arguments_exit_2_naming_the_flag():
    cases = [
        (["create", "--name", "Grit", "--zone", "us-east5-a", "--accelerator", "v5p-8"], "--name"),
        (["create", "--name", "g", "--zone", "east", "--accelerator", "v5p-8"], "--zone"),
        (["create", *BASE, "--accelerator", "v9-8"], "--accelerator"),
        (["train", *BASE, "--config", "configs/gritlm_7b.py", "--workdir", "gs://b/r"],
         "absolute path on shared storage"),
        (["train", *BASE, "--config", "configs/nope.py", "--workdir", "/gcs/b"], "--config"),
        (["setup", *BASE, "--source", ".", "--mount-bucket", "gs://b"], "--mount-bucket"),
        (["setup", *BASE], "--repo URL"),
    ]
    for args, needle in cases:
        rc, out, err = run(*args, "--dry-run")
        assert rc == 2 and needle in err and out == [], (args, err)
    rc, out, _ = run("--help")
    assert rc == 0 and any("create" in line for line in out)
    for sub in ("create", "setup", "train", "logs", "resume", "delete"):
        rc, out, _ = run(sub, "--help")
        assert rc == 0 and out[0].startswith(f"usage: launch/tpu.py {sub}")
