"""How the absl commands start (main.py, sweep, preflight, export, evaluate): `run(main, module)`.

It is absl's app.run(main), exiting with main's return value, and three things app.run does not
do for these commands. A mistyped flag or a wrongly typed value is one line on stderr and exit
2, naming the flag, the closest valid names (for a `--config.` override, the config's own
fields) and for a value the type the field takes, where absl and ml_collections print a
traceback or a FATAL line and exit 1. `--help` (and --helpshort, --helpfull) exits 0, as argparse's does, where
absl exits 1. As a console script (`edgepopup-sweep`: sys.argv[0] is the script, `__main__` its
wrapper), the help still shows the command's docstring and flags: absl looks both up under
`__main__` and sys.argv[0], where `python -m` puts the command's own module.
"""
from __future__ import annotations

import difflib
import re
import runpy
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


def _config_fields(argv: list[str]) -> dict:
    """{dotted field: value} of the config file named by --config=path[:arg] in argv, loaded
    as config_flags loads it; {} when there is none or it does not load."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not spec:
        return {}
    path, _, arg = spec.partition(":")
    try:
        module = runpy.run_path(path)
        config = module["get_config"](arg) if arg else module["get_config"]()
        flat = {}

        def walk(prefix, d):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    flat[f"{prefix}{k}"] = v
        walk("", config.to_dict())
        return flat
    except Exception:  # noqa: BLE001 - the config's own error is reported by the flag itself
        return {}


def _closest(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f"; closest: {', '.join(close)}" if close else ""


def _override(argv: list[str], key: str | None) -> str | None:
    """The --config.X=... argument of argv whose dotted name ends with key (the last such)."""
    for arg in reversed(argv):
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and (key is None or name.split(".")[-1] == key
                                             or name[len("--config."):] == key):
            return arg
    return None


def explain(error: Exception, argv: list[str]) -> str:
    """One line for a command line that absl or ml_collections refused."""
    text = str(error).strip()
    fields = _config_fields(argv)
    # A --config. override of a field the config does not have (ml_collections: AttributeError
    # or KeyError naming the missing key, maybe with its own "Did you mean").
    if isinstance(error, (AttributeError, KeyError)):
        key = re.split(r"[\\'\"\s]", text.strip("'\""))[0]
        arg = _override(argv, key) or _override(argv, None)
        name = arg.split("=", 1)[0][len("--config."):] if arg else key
        return (f"{arg or key}: the config has no field {name}"
                f"{_closest(name, fields) or _closest(key, [f.split('.')[-1] for f in fields])}")
    m = re.search(r"flag (--config\.[\w.]+)=(.*?): (.*)", text)
    if m:  # a value the field's type does not take
        flag, value, why = m.groups()
        name = flag[len("--config."):]
        kind = type(fields[name]).__name__ if name in fields and fields[name] is not None else None
        article = "an" if kind and kind[0] in "aeiou" else "a"
        takes = f"{name} takes {article} {kind}" if kind else f"{name} cannot take it"
        return f"{flag}={value}: {takes}, got {value!r} ({why})"
    m = re.search(r"Unknown command line flag '([\w.]+)'", text)
    if m:
        return text.splitlines()[0].rstrip(".") + "; see --help for the flags"
    return text.splitlines()[0]


def _parse_flags(argv: list[str]) -> list[str]:
    if asks_for_help(argv):
        try:
            return app.parse_flags_with_usage(argv)
        except SystemExit as e:
            raise SystemExit(0 if e.code == 1 else e.code) from None  # absl exits 1 after help
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {explain(e, argv)}", file=sys.stderr)
        raise SystemExit(2) from None


def run(main: Callable[[list[str]], int], module: types.ModuleType) -> None:
    """app.run(main) for `module`, the command's module, whose flags are defined by now."""
    entry = sys.modules["__main__"]
    if module is not entry:  # a console script
        for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
        entry.__doc__ = module.__doc__
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
