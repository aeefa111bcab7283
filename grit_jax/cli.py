"""How every grit_jax command treats bad input and logs: a user error is one line and exit 2.

A user error (a file, flag, field or value the user gave) prints ``error: ...`` on stderr and
exits 2, without a traceback; ``--debug`` (any command) or ``GRIT_JAX_DEBUG=1`` shows it. An
internal error (a bug, or a library failing where our own checks did not expect it) keeps its
traceback. Library INFO chatter (Orbax, TFDS, absl) is off unless ``--verbose`` is given.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

DEBUG_ENV = "GRIT_JAX_DEBUG"
USAGE_EXIT = 2
_OURS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    __file__, os.path.join(os.path.dirname(__file__), "..", "launch", "x"),
    os.path.join(os.path.dirname(__file__), "..", "benchmarks", "x")))


class UserError(Exception):
    """Bad input from the user: printed as one line (it names the file, flag or field) + exit 2."""


def _raised_here(e: BaseException) -> bool:
    """Whether the innermost frame that raised e is grit_jax's own code (or a builtin it called,
    such as ``open`` on a user's path), not a library's internals."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_OURS)


def is_user_error(e: BaseException) -> bool:
    """UserError anywhere; ValueError/OSError raised by grit_jax's own checks or file access."""
    if isinstance(e, UserError):
        return True
    return isinstance(e, (ValueError, OSError)) and _raised_here(e)


def message(e: BaseException) -> str:
    """One line for a user error: OSErrors as ``path: reason``."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
    return " ".join(str(e).split()) or type(e).__name__


def quiet_libraries(verbose: bool = False) -> None:
    """Library INFO lines off (Orbax logs a few dozen per checkpoint) unless verbose."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("absl", "orbax", "tensorflow_datasets", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(level)
    try:
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


def _quiet_abandoned_tasks(unraisable) -> None:
    """Drop the interpreter's "Exception ignored" reports of library coroutines abandoned by a
    failed read (Orbax restoring a damaged checkpoint): the failure itself was reported."""
    if inspect.iscoroutine(unraisable.object) or "Event loop is closed" in str(
            unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


def _pop_flag(argv: list[str], *names: str) -> bool:
    found = False
    for name in names:
        while name in argv:
            argv.remove(name)
            found = True
    return found


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into ``error: ...`` + exit 2 (see the module)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _pop_flag(argv, "--debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    quiet_libraries(verbose=_pop_flag(argv, "--verbose", "-v"))
    if not debug:
        sys.unraisablehook = _quiet_abandoned_tasks
    try:
        dashes = [a for a in argv if a == "--" or a.endswith("=--")]
        if dashes:  # argparse would turn "--flag=--" into an empty list, not an error
            raise UserError(f"{dashes[0]}: '--' is not a value, and these commands take no "
                            f"positional arguments")
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse's usage errors (exit 2) and explicit exits
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_EXIT)
    except Exception as e:  # noqa: BLE001 - the boundary between a command and its user
        if debug or not is_user_error(e):
            traceback.print_exc()
            return 1
        print(f"error: {message(e)}", file=sys.stderr)
        return USAGE_EXIT


def absl_flags(argv: list[str], prog: str) -> list[str]:
    """Parse absl flags (``--config`` files included) with errors as UserError; the rest of argv.

    A config file that is missing, does not parse or raises inside ``get_config()`` is named with
    the line that failed.
    """
    _check_config_file(argv)
    if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv):
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        print(f"usage: {prog} [flags]\n\n{doc}\n\n" + (flags.FLAGS.main_module_help()
                                                         or flags.FLAGS.get_help()))
        raise SystemExit(0)
    # A second parse in one process (tests, notebooks) starts from the defaults, without the
    # --config.x override flags that ml_collections registered during the first.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    saved, sys.argv = sys.argv, [prog, *argv]  # ml_collections reads --config.x overrides there
    try:
        rest = flags.FLAGS([prog, *argv])
    except flags.Error as e:
        raise UserError(_flag_error(str(e))) from None
    except SyntaxError as e:
        raise UserError(f"--config {e.filename}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file
        where = _config_line((f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__))
        raise UserError(f"--config: {where}{type(e).__name__}: {message(e)}") from None
    finally:
        sys.argv = saved
    if len(rest) > 1:
        raise UserError(f"unexpected argument {rest[1]!r} (flags are --name=value)")
    return rest


def _flag_error(text: str) -> str:
    """One line for a flag error; ml_collections folds a ``get_config(ARG)`` traceback into it."""
    head, sep, tb = text.partition("Traceback (most recent call last):")
    if not sep:
        return text.replace("\n", " ")
    lines = [ln.strip() for ln in tb.splitlines() if ln.strip()]
    at = _config_line(m.groups() for m in map(re.compile(r'File "([^"]+)", line (\d+)').match,
                                                 lines) if m)
    return f"{head.replace('Error whilst parsing config file:', '').strip()} {at}{lines[-1]}"


def _config_line(frames) -> str:
    """``"file:line: "`` of the innermost (filename, line) frame outside grit_jax and installed
    packages (the user's config file), or "" when there is none."""
    users = [(f, n) for f, n in frames if not f.startswith(_OURS[0]) and "site-packages" not in f]
    return f"{users[-1][0]}:{users[-1][1]}: " if users else ""


def _check_config_file(argv: list[str]) -> None:
    """A --config that names no file is one line (ml_collections would raise from its parser)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if value is None:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise UserError(f"--config {value}: no such file")
        # Config files import their defaults (``from configs import base``): make the folder
        # above theirs importable, whatever the working directory.
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.insert(0, root)
