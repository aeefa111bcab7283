"""Training configs: ``base.py`` holds the defaults, each other file states what differs."""

import importlib.util


def load(path: str, setting: str | None = None):
    """A config file's ``get_config([setting])``, as ``--config path[:setting]`` reads it."""
    spec = importlib.util.spec_from_file_location("grit_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if setting is None else module.get_config(setting)
