"""Outputs appear whole or not at all, and never over earlier work unless the user asks.

``staged_dir(target)``: the caller writes into a hidden sibling folder; on success it is moved
into place (files get the user's umask), on failure it is deleted, so a failed command leaves
the target as it was. A target that already holds files is refused before any work starts,
unless ``overwrite``: then all of it is replaced (no stale shard or index survives). Object
storage (gs://) has no rename: there a target must be new or empty, and files are written in
place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from grit_jax import storage
from grit_jax.cli import UserError


def check_target(target: str, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse a target that is a file, or a folder holding files (unless overwrite)."""
    if not target or not str(target).strip():
        raise UserError(f"{flag}: an empty path; give the folder to write")
    if storage.is_remote(target):
        held = storage.listdir(target) if storage.isdir(target) else []
        if held and overwrite:  # no atomic replace on object storage: never delete first
            raise UserError(f"{flag} {target}: --overwrite works on local folders only (object "
                            f"storage cannot swap a folder whole); choose a new gs:// path")
    elif os.path.exists(target):
        if not os.path.isdir(target):
            raise UserError(f"{flag} {target}: is a file, not a folder; choose a folder path")
        held = os.listdir(target)
    else:
        held = []
    if held and not overwrite:
        shown = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3 else "")
        raise UserError(f"{flag} {target}: already holds {len(held)} entr"
                        f"{'y' if len(held) == 1 else 'ies'} ({shown}); choose a new folder, or "
                        f"pass --overwrite to replace all of it")


def _apply_umask(root: str) -> None:
    """mkdtemp/mkstemp-made modes (0700/0600) -> what the user's umask gives new files."""
    mask = storage.umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~mask)


def replace_dir(new: str, target: str) -> None:
    """Move folder ``new`` to ``target``; an existing target is moved aside first, then deleted."""
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.",
                               dir=os.path.dirname(os.path.abspath(target)))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str, *, overwrite: bool = False, flag: str = "--out"):
    """Yield a folder to write the output into; it becomes ``target`` only if the block succeeds."""
    check_target(target, overwrite=overwrite, flag=flag)
    if storage.is_remote(target):
        yield target
        return
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(target))}.partial.",
                               dir=parent)
    try:
        yield staging
        _apply_umask(staging)
        replace_dir(staging, target)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def write_file(path: str, text: str, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Write a text output file whole (temporary name, then renamed); refuse an existing one."""
    if storage.exists(path) and not overwrite:
        raise UserError(f"{flag} {path}: already exists; choose a new path, or pass --overwrite")
    storage.write_text(path, text)
