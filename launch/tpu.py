#!/usr/bin/env python3
"""Run grit_jax training on a Cloud TPU VM or pod slice with `gcloud compute tpus`.

    python launch/tpu.py create  --name grit --zone us-east5-a --accelerator v5p-128 [--spot]
    python launch/tpu.py setup   --name grit --zone us-east5-a (--repo URL | --source DIR) \\
                                 [--mount-bucket BUCKET]
    python launch/tpu.py train   --name grit --zone us-east5-a --config configs/gritlm_7b.py \\
                                 --workdir /gcs/BUCKET/gritlm7b [-- --config.init_from=...]
    python launch/tpu.py logs    --name grit --zone us-east5-a [--worker 0]
    python launch/tpu.py resume  --name grit --zone us-east5-a ... (same flags as train)
    python launch/tpu.py delete  --name grit --zone us-east5-a

Every command takes --dry-run: print the exact gcloud commands instead of running them.
`train` starts the same command on every worker (--worker=all); each host initialises
jax.distributed from the TPU environment and feeds its slice of the data. `resume` recreates a
preempted slice and restarts training, which continues from the last checkpoint in --workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v6e)-([0-9]+)$")
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}
LOG = "~/grit_train.log"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
    """A bad argument: named in the message, exit code 2."""


def check(args) -> None:
    """Validate arguments before any gcloud call."""
    if not NAME.match(args.name):
        raise UsageError(f"--name {args.name!r}: lowercase letters, digits and hyphens, starting "
                         f"with a letter, at most 63 characters")
    if not ZONE.match(args.zone):
        raise UsageError(f"--zone {args.zone!r}: expected a zone such as us-east5-a")
    acc = getattr(args, "accelerator", None)
    if acc is not None and not ACCELERATOR.match(acc):
        raise UsageError(f"--accelerator {acc!r}: expected v4-N, v5p-N, v5litepod-N or v6e-N")
    if getattr(args, "workdir", None) is not None and not args.workdir.startswith("/"):
        raise UsageError(f"--workdir {args.workdir!r}: every host must see the same checkpoints "
                         f"and metrics: an absolute path on shared storage, e.g. /gcs/BUCKET/run "
                         f"(setup --mount-bucket BUCKET mounts a bucket there on every worker)")
    bucket = getattr(args, "mount_bucket", None)
    if bucket is not None and not re.match(r"^[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9]$", bucket):
        raise UsageError(f"--mount-bucket {bucket!r}: a bucket name, without gs://")
    if args.command in ("setup", "resume") and not (args.repo or args.source):
        raise UsageError("give --repo URL (every worker clones it) or --source DIR (copied)")
    config = getattr(args, "config", None)
    if config is not None and not os.path.exists(os.path.join(ROOT, config)):
        raise UsageError(f"--config {config!r}: no such file in {ROOT} (paths are relative to the "
                         f"repository, which every worker has at ~/grit_jax)")


def _base(args) -> list[str]:
    out = ["--zone", args.zone]
    if args.project:
        out += ["--project", args.project]
    return out


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name] + _base(args)
            + [f"--worker={worker}", "--command", command])


def create_commands(args) -> list[list[str]]:
    version = args.runtime or RUNTIME[ACCELERATOR.match(args.accelerator).group(1)]
    if args.spot or args.queued:
        cmd = (["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
                "--node-id", args.name] + _base(args)
               + ["--accelerator-type", args.accelerator, "--runtime-version", version])
        return [cmd + (["--spot"] if args.spot else []), ["WAIT"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name] + _base(args)
            + ["--accelerator-type", args.accelerator, "--version", version]]


def mount_command(args) -> list[str]:
    b = args.mount_bucket
    return _ssh(args, f"sudo mkdir -p /gcs/{b} && sudo chown $USER /gcs/{b} && "
                      f"(mountpoint -q /gcs/{b} || gcsfuse --implicit-dirs {b} /gcs/{b})")


def setup_commands(args) -> list[list[str]]:
    mount = [mount_command(args)] if getattr(args, "mount_bucket", None) else []
    install = ("python3 -m venv ~/grit_jax/.venv && ~/grit_jax/.venv/bin/pip install -q -U pip "
               "&& ~/grit_jax/.venv/bin/pip install -q -e \"$HOME/grit_jax[tpu]\"")
    if args.source:  # the committed tree of a local checkout (no venv, no outputs)
        tarball = f"/tmp/{args.name}-grit_jax.tar.gz"
        archive = ["git", "-C", args.source, "archive", "--format=tar.gz", "--prefix=grit_jax/",
                   "-o", tarball, "HEAD"]
        copy = (["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:~/"]
                + _base(args) + ["--worker=all"])
        unpack = (f"rm -rf ~/grit_jax && tar xzf ~/{os.path.basename(tarball)} -C ~ && "
                  f"{install}")
        return [archive, copy, _ssh(args, unpack)] + mount
    fetch = (f"(test -d ~/grit_jax && git -C ~/grit_jax pull --ff-only) || "
             f"git clone {shlex.quote(args.repo)} ~/grit_jax")
    return [_ssh(args, f"{fetch} && {install}")] + mount


def train_command(args) -> list[str]:
    train = ["~/grit_jax/.venv/bin/python", "-m", "grit_jax.train", "--config",
             f"~/grit_jax/{args.config}", "--workdir", args.workdir] + list(args.overrides)
    run = " ".join(a if a.startswith("~/") else shlex.quote(a) for a in train)
    return _ssh(args, f"cd ~/grit_jax && nohup {run} > {LOG} 2>&1 &")


def logs_command(args) -> list[str]:
    return _ssh(args, f"tail -n 200 -F {LOG}", worker=str(args.worker))


def delete_commands(args) -> list[list[str]]:
    cmds = [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name] + _base(args)
            + ["--quiet"]]
    if args.queued or args.spot:
        cmds.append(["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr"]
                    + _base(args) + ["--quiet", "--force"])
    return cmds


def state_command(args) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name] + _base(args)
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
    """Recreate a preempted (or deleted) slice, set it up and restart training."""
    if args.dry_run:
        print(f"# if `{shlex.join(state_command(args))}` prints PREEMPTED, or fails (gone):")
        state = "PREEMPTED"
    else:
        proc = subprocess.run(state_command(args), capture_output=True, text=True)
        state = proc.stdout.strip() if proc.returncode == 0 else "GONE"
        print(f"state of {args.name}: {state}")
    if state == "READY":
        print("the slice is running; restarting training (it resumes from the last checkpoint)")
        return execute([train_command(args)], args.dry_run, args)
    if state not in ("PREEMPTED", "GONE", "TERMINATED"):
        print(f"error: {args.name} is {state}; wait or delete it", file=sys.stderr)
        return 1
    cmds = (delete_commands(args) if state != "GONE" else []) + create_commands(args)
    return execute(cmds + setup_commands(args) + [train_command(args)], args.dry_run, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(name, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--name", required=True, help="TPU VM / slice name")
        s.add_argument("--zone", required=True, help="e.g. us-east5-a")
        s.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
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
                       help="mount this GCS bucket at /gcs/BUCKET on every worker (gcsfuse)")

    def training(s):
        s.add_argument("--config", required=True, help="config file inside the repository")
        s.add_argument("--workdir", required=True,
                       help="absolute path every host shares (e.g. /gcs/BUCKET/run)")
        s.add_argument("overrides", nargs="*", help="after --: flags for grit_jax.train")

    hardware(common("create", "create the TPU VM / slice"))
    source(common("setup", "install grit_jax[tpu] on every worker"))
    training(common("train", "start training on every worker (--worker=all)"))
    s = common("logs", "stream a worker's training log")
    s.add_argument("--worker", type=int, default=0)
    s = common("resume", "recreate a preempted slice and restart training")
    hardware(s)
    source(s)
    training(s)
    s = common("delete", "delete the slice (and its queued resource)")
    s.add_argument("--spot", action="store_true")
    s.add_argument("--queued", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "create":
        return execute(create_commands(args), args.dry_run, args)
    if args.command == "setup":
        return execute(setup_commands(args), args.dry_run)
    if args.command == "train":
        return execute([train_command(args)], args.dry_run)
    if args.command == "logs":
        return execute([logs_command(args)], args.dry_run)
    if args.command == "delete":
        return execute(delete_commands(args), args.dry_run)
    return resume(args)


if __name__ == "__main__":
    sys.exit(main())
