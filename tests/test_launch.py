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


def test_create_on_demand_spot_and_multislice():
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
    # Two slices: one queued resource with a node count (queued even without --queued).
    rc, out, _ = run("create", *BASE, "--accelerator", "v5p-128", "--slices", "2", "--dry-run")
    assert rc == 0 and out[0] == (
        "gcloud compute tpus queued-resources create grit-qr --node-prefix grit --node-count 2 "
        "--zone us-east5-a --accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5")


def test_setup_makes_a_python311_env_with_uv_and_mounts_read_only():
    rc, out, _ = run("setup", *BASE, "--repo", "https://example.org/grit_jax.git", "--dry-run")
    cmd = shlex.split(out[0])
    assert rc == 0 and cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grit"]
    assert "--worker=all" in cmd and len(out) == 1
    script = cmd[-1]
    assert "git clone https://example.org/grit_jax.git ~/grit_jax" in script
    assert ("python3 -m pip install -q --user --upgrade uv && ~/.local/bin/uv venv -q --python "
            "3.11 --seed --allow-existing ~/grit_jax/.venv && ~/.local/bin/uv pip install -q "
            "--python ~/grit_jax/.venv/bin/python -e \"$HOME/grit_jax[tpu]\"") in script
    rc, out, _ = run("setup", *BASE, "--source", ".", "--mount-bucket", "my-grit", "--slices",
                     "2", "--dry-run")
    assert rc == 0 and out[0].startswith("git -C . archive --format=tar.gz --prefix=grit_jax/")
    # archive, then per slice: copy, unpack + install, mount
    assert len(out) == 7
    assert [shlex.split(line)[5] for line in out[1:3]] == ["/tmp/grit-grit_jax.tar.gz"] * 2
    assert [shlex.split(line)[6] for line in out[1:3]] == ["grit-0:~/", "grit-1:~/"]
    assert [shlex.split(line)[5] for line in out[3:]] == ["grit-0", "grit-1", "grit-0", "grit-1"]
    mount = shlex.split(out[-1])[-1]
    assert mount.startswith("command -v gcsfuse >/dev/null || {")  # installed when missing
    assert "sudo apt-get install -y -q gcsfuse" in mount
    assert "gcsfuse -o ro --implicit-dirs my-grit /gcs/my-grit" in mount


def test_train_on_every_worker_of_every_slice_and_logs():
    rc, out, _ = run("train", *BASE, "--config", "configs/gritlm_7b.py", "--workdir",
                     "gs://b/r", "--slices", "2", "--dry-run", "--",
                     "--config.init_from=/gcs/b/mistral")
    assert rc == 0 and len(out) == 2
    for node, line in zip(("grit-0", "grit-1"), out):
        cmd = shlex.split(line)
        assert cmd[5] == node and "--worker=all" in cmd
        assert cmd[-1] == (
            "cd ~/grit_jax && nohup bash -c '~/grit_jax/.venv/bin/python -m grit_jax.train "
            "--config ~/grit_jax/configs/gritlm_7b.py --workdir gs://b/r "
            "--config.init_from=/gcs/b/mistral > ~/grit_train.log 2>&1; gcloud storage cp "
            "~/grit_train.log gs://b/r/logs/$(hostname).log' >/dev/null 2>&1 &")
    rc, out, _ = run("logs", *BASE, "--worker", "3", "--dry-run")
    assert rc == 0 and "--worker=3" in out[0] and "tail -n 200 -F ~/grit_train.log" in out[0]
    rc, out, _ = run("logs", *BASE, "--worker", "all", "--slices", "2", "--dry-run")
    assert rc == 0 and len(out) == 2 and all("--worker=all" in line for line in out)
    assert "sed \"s/^/$(hostname): /\"" in shlex.split(out[1])[-1]
    rc, out, _ = run("delete", *BASE, "--spot", "--dry-run")
    assert rc == 0 and out == ["gcloud compute tpus queued-resources delete grit-qr --zone "
                               "us-east5-a --quiet --force"]
    rc, out, _ = run("delete", *BASE, "--dry-run")
    assert rc == 0 and out == ["gcloud compute tpus tpu-vm delete grit --zone us-east5-a --quiet"]


def test_resume_recreates_sets_up_and_trains():
    rc, out, _ = run("resume", *BASE, "--accelerator", "v5p-128", "--spot", "--repo", "u",
                     "--config", "configs/gritlm_7b.py", "--workdir", "gs://b/r", "--dry-run")
    assert rc == 0
    kinds = [line.split()[3:5] if line.startswith("gcloud") else line[:8] for line in out]
    assert kinds == ["# if `gc", ["queued-resources", "delete"], ["queued-resources", "create"],
                     "# repeat", ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert "grit_jax.train" in out[-1] and "gs://b/r" in out[-1]
    rc, out, _ = run("resume", *BASE, "--accelerator", "v5p-128", "--slices", "2", "--repo", "u",
                     "--config", "configs/gritlm_7b.py", "--workdir", "gs://b/r", "--dry-run")
    assert rc == 0 and "describe grit-0" in out[0]
    assert sum("grit_jax.train" in line for line in out) == 2  # one per slice


def test_bad_arguments_exit_2_naming_the_flag():
    cases = [
        (["create", "--name", "Grit", "--zone", "us-east5-a", "--accelerator", "v5p-8"], "--name"),
        (["create", "--name", "g", "--zone", "east", "--accelerator", "v5p-8"], "--zone"),
        (["create", *BASE, "--accelerator", "v9-8"], "--accelerator"),
        (["create", *BASE, "--accelerator", "v5p-8", "--slices", "0"], "--slices"),
        (["train", *BASE, "--config", "configs/gritlm_7b.py", "--workdir", "b/r"],
         "a bucket path gs://BUCKET/run"),
        (["train", *BASE, "--config", "configs/nope.py", "--workdir", "gs://b"], "--config"),
        (["setup", *BASE, "--source", ".", "--mount-bucket", "gs://b"], "--mount-bucket"),
        (["setup", *BASE], "--repo URL"),
        (["logs", *BASE, "--worker", "x"], "--worker"),
        (["logs", *BASE, "--worker", "1", "--slice", "1"], "--slice"),
    ]
    for args, needle in cases:
        rc, out, err = run(*args, "--dry-run")
        assert rc == 2 and needle in err and out == [], (args, err)
    rc, out, _ = run("--help")
    assert rc == 0 and any("create" in line for line in out)
    for sub in ("create", "setup", "train", "logs", "resume", "delete"):
        rc, out, _ = run(sub, "--help")
        assert rc == 0 and out[0].startswith(f"usage: launch/tpu.py {sub}")
