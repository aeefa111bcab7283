"""Paths on local disk or in object storage (``gs://``), through ``etils.epath``.

Training workdirs may live in a bucket: Orbax and TensorStore write checkpoints there directly
(no directory renames through a mount), and the small files around them (model config,
tokenizer, metrics, TensorBoard events) go through these helpers. Object stores have no append
and no atomic rename of directories, so files are written whole: a local file with a temporary
name moved into place, an object in one upload.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: str) -> bool:
    """Whether path is an object-store URL (``gs://...``) rather than a local path."""
    return "://" in str(path)


def normalize(path: str) -> str:
    """An absolute local path, or the URL as given."""
    return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(*parts: str) -> str:
    """Path join that keeps URLs intact."""
    return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
    """Create a directory and its parents (object stores need none: a no-op there)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names in a directory ([] if it does not exist)."""
    p = epath.Path(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []


def read_bytes(path: str) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: locally to a temporary name then renamed (never a half-written file
    under the final name); to an object store in one upload."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two places (local or object store)."""
    write_bytes(dst, read_bytes(src))


def copy_tree(src: str, dst: str) -> int:
    """Copy a directory tree (e.g. a built dataset in a bucket to local disk); returns files."""
    count = 0
    for name in listdir(src):  # epath's rglob is not implemented for gs://
        child = join(src, name)
        if isdir(child):
            count += copy_tree(child, join(dst, name))
        else:
            copy_file(child, join(dst, name))
            count += 1
    return count


def set_aside(path: str, folder: str) -> str:
    """Move a directory into ``folder`` (kept, under a free name) and return its new path; on
    object storage, which has no rename, copied and then deleted."""
    name = os.path.basename(path.rstrip("/"))
    makedirs(folder)
    taken = set(listdir(folder))
    dest = join(folder, next(f"{name}.{k}" if k else name for k in range(len(taken) + 2)
                             if (f"{name}.{k}" if k else name) not in taken))
    if is_remote(path):
        copy_tree(path, dest)
        epath.Path(path).rmtree()
    else:
        os.rename(path, dest)
    return dest


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
