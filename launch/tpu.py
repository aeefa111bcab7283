#!/usr/bin/env python3
"""Run grit_jax training on Cloud TPU VMs: one slice or several (multislice), with gcloud.

    python launch/tpu.py create  --name grit --zone us-east5-a --accelerator v5p-128 [--spot]
                                 [--slices 2]
    python launch/tpu.py setup   --name grit --zone us-east5-a (--repo URL | --source DIR) \\
                                 [--mount-bucket BUCKET] [--slices 2]
    python launch/tpu.py train   --name grit --zone us-east5-a --config configs/gritlm_7b.py \\
                                 --workdir gs://BUCKET/gritlm7b [--slices 2] [-- --config.x=...]
    python launch/tpu.py logs    --name grit --zone us-east5-a [--worker all|N] [--slices 2]
    python launch/tpu.py resume  --name grit --zone us-east5-a ... (the flags of create + train)
    python launch/tpu.py delete  --name grit --zone us-east5-a [--slices 2]

Every command takes --dry-run: print the exact commands instead of running them.

- Several slices are one queued resource with ``--node-count``; its nodes are NAME-0, NAME-1,
  ...; the TPU runtime tells every host its slice, so ``jax.distributed.initialize()`` (in
  grit_jax.train) finds all of them and the config's ``dcn_mesh`` lays data parallelism across.
- ``setup`` makes a Python 3.11 environment with uv (jax 0.10 needs Python >= 3.11; TPU VM
  images ship older ones) and installs grit_jax[tpu]. ``--mount-bucket`` installs gcsfuse if it
  is missing and mounts the bucket read-only at /gcs/BUCKET, for data; checkpoints, metrics and
  TensorBoard go to a gs:// workdir directly (Orbax commits without directory renames there).
- ``train`` starts the same command on every worker of every slice (``--worker=all``); each
  writes ~/grit_train.log and, for a gs:// workdir, copies it to WORKDIR/logs/HOST.log when
  training ends. ``logs`` tails one worker or all (lines prefixed with the host name).
- ``resume`` recreates a preempted (or deleted) slice set and restarts training, which continues
  from the last checkpoint in the workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v6e)-([0-9]+)$")
BUCKET = re.compile(r"^[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9]$")
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}
PYTHON = "3.11"
LOG = "~/grit_train.log"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UV = "~/.local/bin/uv"
VENV = "~/grit_jax/.venv"


class UsageError(ValueError):
    """A bad argument: named in the message, exit code 2."""


def check(args) -> None:
    """Validate arguments before any gcloud call."""
    if not NAME.match(args.name):
        raise UsageError(f"--name {args.name!r}: lowercase letters, digits and hyphens, starting "
                         f"with a letter, at most 63 characters")
    if not ZONE.match(args.zone):
        raise UsageError(f"--zone {args.zone!r}: expected a zone such as us-east5-a")
    if args.slices < 1:
        raise UsageError(f"--slices {args.slices}: at least 1")
    acc = getattr(args, "accelerator", None)
    if acc is not None and not ACCELERATOR.match(acc):
        raise UsageError(f"--accelerator {acc!r}: expected v4-N, v5p-N, v5litepod-N or v6e-N")
    workdir = getattr(args, "workdir", None)
    if workdir is not None and not (workdir.startswith("gs://") or workdir.startswith("/")):
        raise UsageError(f"--workdir {workdir!r}: every host must see the same checkpoints and "
                         f"metrics: a bucket path gs://BUCKET/run (recommended: checkpoints are "
                         f"written there directly), or an absolute path on shared storage")
    bucket = getattr(args, "mount_bucket", None)
    if bucket is not None and not BUCKET.match(bucket):
        raise UsageError(f"--mount-bucket {bucket!r}: a bucket name, without gs://")
    if args.command in ("setup", "resume") and not (args.repo or args.source):
        raise UsageError("give --repo URL (every worker clones it) or --source DIR (copied)")
    config = getattr(args, "config", None)  # configs/x.py, or configs/x.py:ARG (a preset)
    if config is not None and not os.path.exists(os.path.join(ROOT, config.partition(":")[0])):
        raise UsageError(f"--config {config!r}: no such file in {ROOT} (paths are relative to the "
                         f"repository, which every worker has at ~/grit_jax)")
    if args.command in ("create", "resume") and args.slices > 1 and not (args.spot or args.queued):
        args.queued = True  # several slices are always one queued resource


def nodes(args) -> list[str]:
    """The TPU VM names: NAME for one slice, NAME-0 ... NAME-(N-1) for N slices."""
    return [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]


def _base(args) -> list[str]:
    out = ["--zone", args.zone]
    if args.project:
        out += ["--project", args.project]
    return out


def _ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", node] + _base(args)
            + [f"--worker={worker}", "--command", command])


def _each(args, command: str, worker: str = "all") -> list[list[str]]:
    return [_ssh(args, node, command, worker) for node in nodes(args)]


def create_commands(args) -> list[list[str]]:
    version = args.runtime or RUNTIME[ACCELERATOR.match(args.accelerator).group(1)]
    if args.spot or args.queued:
        placement = (["--node-id", args.name] if args.slices == 1 else
                     ["--node-prefix", args.name, "--node-count", str(args.slices)])
        cmd = (["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr"]
               + placement + _base(args)
               + ["--accelerator-type", args.accelerator, "--runtime-version", version])
        return [cmd + (["--spot"] if args.spot else []), ["WAIT"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name] + _base(args)
            + ["--accelerator-type", args.accelerator, "--version", version]]


def mount_script(bucket: str) -> str:
    """Install gcsfuse when missing (Google's apt repository), then mount read-only."""
    install = ("command -v gcsfuse >/dev/null || { "
               "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
               "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
               "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
               "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
               "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
               "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }")
    mount = (f"sudo mkdir -p /gcs/{bucket} && sudo chown $USER /gcs/{bucket} && "
             f"(mountpoint -q /gcs/{bucket} || gcsfuse -o ro --implicit-dirs {bucket} "
             f"/gcs/{bucket})")
    return f"{install} && {mount}"


def install_script() -> str:
    """A Python 3.11 venv made by uv (from PyPI; uv fetches the interpreter) with grit_jax[tpu]."""
    return (f"python3 -m pip install -q --user --upgrade uv && "
            f"{UV} venv -q --python {PYTHON} --seed --allow-existing {VENV} && "
            f"{UV} pip install -q --python {VENV}/bin/python -e \"$HOME/grit_jax[tpu]\"")


def setup_commands(args) -> list[list[str]]:
    mount = _each(args, mount_script(args.mount_bucket)) if args.mount_bucket else []
    if args.source:  # the committed tree of a local checkout (no venv, no outputs)
        tarball = f"/tmp/{args.name}-grit_jax.tar.gz"
        archive = ["git", "-C", args.source, "archive", "--format=tar.gz", "--prefix=grit_jax/",
                   "-o", tarball, "HEAD"]
        copies = [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:~/"]
                  + _base(args) + ["--worker=all"] for node in nodes(args)]
        unpack = (f"rm -rf ~/grit_jax && tar xzf ~/{os.path.basename(tarball)} -C ~ && "
                  f"{install_script()}")
        return [archive] + copies + _each(args, unpack) + mount
    fetch = (f"(test -d ~/grit_jax && git -C ~/grit_jax pull --ff-only) || "
             f"git clone {shlex.quote(args.repo)} ~/grit_jax")
    return _each(args, f"{fetch} && {install_script()}") + mount


def train_script(args) -> str:
    train = [f"{VENV}/bin/python", "-m", "grit_jax.train", "--config",
             f"~/grit_jax/{args.config}", "--workdir", args.workdir] + list(args.overrides)
    run = " ".join(a if a.startswith("~/") else shlex.quote(a) for a in train)
    keep = ""
    if args.workdir.startswith("gs://"):  # every worker's log beside the checkpoints
        dest = shlex.quote(args.workdir.rstrip("/") + "/logs/")
        keep = f"; gcloud storage cp {LOG} {dest}$(hostname).log"
    return (f"cd ~/grit_jax && nohup bash -c {shlex.quote(f'{run} > {LOG} 2>&1{keep}')}"
            " >/dev/null 2>&1 &")


def train_commands(args) -> list[list[str]]:
    return _each(args, train_script(args))


def logs_commands(args) -> list[list[str]]:
    if args.worker == "all":  # every worker of every slice, each line tagged with its host
        return _each(args, f"tail -n {args.lines} {LOG} | sed \"s/^/$(hostname): /\"")
    return [_ssh(args, nodes(args)[args.slice], f"tail -n {args.lines} -F {LOG}",
                 worker=args.worker)]


def delete_commands(args) -> list[list[str]]:
    if args.queued or args.spot or args.slices > 1:  # deleting the queued resource frees its VMs
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr"]
                + _base(args) + ["--quiet", "--force"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name] + _base(args)
            + ["--quiet"]]


def state_command(args) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "describe", nodes(args)[0]] + _base(args)
            + ["--format=value(state)"])


def wait_command(args) -> list[str]:
    return (["gcloud", "compute", "tpus", "queued-resources", "describe", f"{args.name}-qr"]
            + _base(args) + ["--format=value(state.state)"])


def execute(cmds, dry_run: bool, args=None) -> int:
    for cmd in cmds:
        if cmd == ["WAIT"]:  # a queued resource is granted later: poll until it is ACTIVE
            print(f"# repeat `{shlex.join(wait_command(args))}` until it prints ACTIVE "
                  f"(at most {args.wait_minutes} min)", flush=True)
            if not dry_run and not wait_active(args):
                return 1
            continue
        print(shlex.join(cmd), flush=True)
        if not dry_run:
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"error: exit {rc}: {shlex.join(cmd)}", file=sys.stderr)
                return rc
    return 0


def wait_active(args) -> bool:
    import time

    deadline = time.time() + 60 * args.wait_minutes
    while time.time() < deadline:
        out = subprocess.run(wait_command(args), capture_output=True, text=True).stdout.strip()
        if out == "ACTIVE":
            return True
        if out in ("FAILED", "SUSPENDED"):
            print(f"error: queued resource {args.name}-qr is {out}", file=sys.stderr)
            return False
        time.sleep(30)
    print(f"error: {args.name}-qr not ACTIVE after {args.wait_minutes} min", file=sys.stderr)
    return False


def resume(args) -> int:
    """Recreate a preempted (or deleted) slice set, set it up and restart training."""
    if args.dry_run:
        print(f"# if `{shlex.join(state_command(args))}` prints PREEMPTED, or fails (gone):")
        state = "PREEMPTED"
    else:
        proc = subprocess.run(state_command(args), capture_output=True, text=True)
        state = proc.stdout.strip() if proc.returncode == 0 else "GONE"
        print(f"state of {nodes(args)[0]}: {state}")
    if state == "READY":
        print("the slice is running; restarting training (it resumes from the last checkpoint)")
        return execute(train_commands(args), args.dry_run, args)
    if state not in ("PREEMPTED", "GONE", "TERMINATED"):
        print(f"error: {nodes(args)[0]} is {state}; wait or delete it", file=sys.stderr)
        return 1
    cmds = (delete_commands(args) if state != "GONE" else []) + create_commands(args)
    return execute(cmds + setup_commands(args) + train_commands(args), args.dry_run, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(name, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--name", required=True, help="TPU VM / slice name (prefix for slices)")
        s.add_argument("--zone", required=True, help="e.g. us-east5-a")
        s.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
        s.add_argument("--slices", type=int, default=1,
                       help="number of slices (multislice: one queued resource, nodes NAME-i)")
        s.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
        return s

    def hardware(s):
        s.add_argument("--accelerator", required=True, help="v4-N, v5p-N, v5litepod-N or v6e-N")
        s.add_argument("--runtime", default=None, help="TPU software version (default per type)")
        s.add_argument("--spot", action="store_true", help="spot capacity via a queued resource")
        s.add_argument("--queued", action="store_true", help="request via a queued resource")
        s.add_argument("--wait-minutes", type=int, default=120,
                       help="how long to wait for a queued resource to become ACTIVE")

    def source(s):
        g = s.add_mutually_exclusive_group()
        g.add_argument("--repo", default=None, help="git URL of grit_jax every worker clones")
        g.add_argument("--source", default=None,
                       help="local git checkout whose HEAD is copied to every worker")
        s.add_argument("--mount-bucket", default=None,
                       help="mount this GCS bucket read-only at /gcs/BUCKET on every worker "
                            "(gcsfuse, installed if missing), e.g. for data")

    def training(s):
        s.add_argument("--config", required=True, help="config file inside the repository")
        s.add_argument("--workdir", required=True,
                       help="gs://BUCKET/run (or an absolute path every host shares)")
        s.add_argument("overrides", nargs="*", help="after --: flags for grit_jax.train")

    hardware(common("create", "create the TPU VM / slices"))
    source(common("setup", "install grit_jax[tpu] (Python 3.11 via uv) on every worker"))
    training(common("train", "start training on every worker of every slice"))
    s = common("logs", "show training logs: one worker (followed) or all (last lines)")
    s.add_argument("--worker", default="0", help="a worker index, or 'all'")
    s.add_argument("--slice", type=int, default=0, help="which slice's worker (with --worker N)")
    s.add_argument("--lines", type=int, default=200)
    s = common("resume", "recreate a preempted slice set and restart training")
    hardware(s)
    source(s)
    training(s)
    s = common("delete", "delete the slices (and their queued resource)")
    s.add_argument("--spot", action="store_true")
    s.add_argument("--queued", action="store_true")
    return p


def main(argv=None) -> int:
    """User errors are one line and exit 2 (--debug or GRIT_JAX_DEBUG=1: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GRIT_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # gcloud or a --source folder that cannot be read
        if debug:
            raise
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2


def _main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
        if not args.dry_run and shutil.which("gcloud") is None:
            raise UsageError("gcloud is not on PATH: install the Google Cloud CLI "
                             "(cloud.google.com/sdk/docs/install), or see the commands with "
                             "--dry-run")
        if args.command == "logs" and args.worker != "all" and not args.worker.isdigit():
            raise UsageError(f"--worker {args.worker!r}: a worker index or 'all'")
        if args.command == "logs" and not 0 <= args.slice < args.slices:
            raise UsageError(f"--slice {args.slice}: must be in [0, {args.slices})")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "create":
        return execute(create_commands(args), args.dry_run, args)
    if args.command == "setup":
        return execute(setup_commands(args), args.dry_run)
    if args.command == "train":
        return execute(train_commands(args), args.dry_run)
    if args.command == "logs":
        return execute(logs_commands(args), args.dry_run)
    if args.command == "delete":
        return execute(delete_commands(args), args.dry_run)
    return resume(args)


if __name__ == "__main__":
    sys.exit(main())
