"""How the absl commands start (main.py, sweep, preflight, export, evaluate): `run(main, module)`.

It is absl's app.run(main), exiting with main's return value, and two things app.run does not
do for these commands. `--help` (and --helpshort, --helpfull) exits 0, as argparse's does, where
absl exits 1. As a console script (`edgepopup-sweep`: sys.argv[0] is the script, `__main__` its
wrapper), the help still shows the command's docstring and flags: absl looks both up under
`__main__` and sys.argv[0], where `python -m` puts the command's own module.
"""
from __future__ import annotations

import sys
import types
from typing import Callable

from absl import app, flags

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def asks_for_help(argv: list[str]) -> bool:
    """Whether argv (program name first) holds a help flag before any `--`."""
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in HELP_FLAGS:
            return True
    return False


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except SystemExit as e:
        if e.code == 1 and asks_for_help(argv):  # absl printed the help asked for, and exits 1
            raise SystemExit(0) from None
        raise


def run(main: Callable[[list[str]], int], module: types.ModuleType) -> None:
    """app.run(main) for `module`, the command's module, whose flags are defined by now."""
    entry = sys.modules["__main__"]
    if module is not entry:  # a console script
        for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
        entry.__doc__ = module.__doc__
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
