"""Every documented command answers --help: exit 0, and its main flags listed.

The `python -m` names (README, docs, notebook, launch scripts) and the console scripts that
setup.py declares, all started at once (each process only imports and prints its flags). A
console script is run as its wrapper runs it (`sys.exit(func())`, sys.argv[0] the script's
name), so no install is needed.
"""
from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (how it is run, its main flags)
MODULE_COMMANDS = {
    "edgepopup_jax.planning.sweep": ("--config", "--workdir", "--sweep", "--figure", "--seeds"),
    "edgepopup_jax.planning.preflight": ("--config", "--target", "--parallel_runs"),
    "edgepopup_jax.subnet.export": ("--workdir", "--out", "--step"),
    "edgepopup_jax.subnet.evaluate": ("--config", "--subnet", "--workdir"),
    "edgepopup_jax.check_data": ("--config", "--workers"),
    "edgepopup_jax.subnet.interop.hidden_networks": ("--checkpoint", "--arch", "--keep_fraction",
                                                     "--out"),
}
MAIN_FLAGS = ("--config", "--workdir", "--multihost")
CONSOLE_SCRIPTS = {
    "edgepopup-sweep": "edgepopup_jax.planning.sweep",
    "edgepopup-preflight": "edgepopup_jax.planning.preflight",
    "edgepopup-export": "edgepopup_jax.subnet.export",
    "edgepopup-evaluate": "edgepopup_jax.subnet.evaluate",
    "edgepopup-check-data": "edgepopup_jax.check_data",
    "edgepopup-import-reference": "edgepopup_jax.subnet.interop.hidden_networks",
}
CONSOLE_SCRIPT = "import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"


def setup_console_scripts() -> dict[str, tuple[str, str]]:
    """name -> (module, function) of setup.py's console_scripts, read with ast."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return {name.strip(): tuple(target.strip().split(":"))
                    for name, target in (s.split("=") for s in scripts)}
    raise AssertionError("setup.py declares no entry_points")


def _commands() -> dict[str, list[str]]:
    commands = {"python main.py": [sys.executable, "main.py"]}
    for module in MODULE_COMMANDS:
        commands[f"python -m {module}"] = [sys.executable, "-m", module]
    for name, (module, func) in setup_console_scripts().items():
        commands[name] = [sys.executable, "-c",
                          CONSOLE_SCRIPT.format(module=module, func=func, name=name)]
    return {label: argv + ["--help"] for label, argv in commands.items()}


def _flags_of(label: str) -> tuple[str, ...]:
    if label == "python main.py":
        return MAIN_FLAGS
    module = label.removeprefix("python -m ")
    return MODULE_COMMANDS[CONSOLE_SCRIPTS.get(module, module)]


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {label: subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
             for label, argv in _commands().items()}
    out = {}
    try:
        for label, proc in procs.items():
            text, _ = proc.communicate(timeout=240)
            out[label] = (proc.returncode, text)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


def test_setup_declares_the_console_scripts():
    assert {name: module for name, (module, _) in setup_console_scripts().items()} == CONSOLE_SCRIPTS


@pytest.mark.parametrize("label", list(_commands()))
def test_help_exits_0_and_lists_the_main_flags(helps, label):
    code, text = helps[label]
    assert code == 0, text[-3000:]
    # absl lists a flag as "  --name: help" (a bool as "  --[no]name: help"); argparse as
    # "  --name NAME  help"
    missing = [f for f in _flags_of(label)
               if not re.search(rf"^\s+--(\[no\])?{f[2:]}\b", text, re.M)]
    assert not missing, f"{label} --help does not list {missing}:\n{text[-3000:]}"


# A mistyped flag or value, on every command that reads one: (label, argv, what the line names)
TYPOS = [
    ("main.py key", ["main.py", "--config=configs/default.py", "--workdir=/nonexistent/w",
                     "--config.model.keep_fractio=0.3"], "closest: model.keep_fraction"),
    ("main.py value", ["main.py", "--config=configs/default.py", "--workdir=/nonexistent/w",
                       "--config.model.keep_fraction=abc"], "model.keep_fraction takes a float"),
    ("main.py int", ["main.py", "--config=configs/default.py", "--workdir=/nonexistent/w",
                     "--config.batch_size=1.5"], "batch_size takes an int"),
    ("sweep key", ["-m", "edgepopup_jax.planning.sweep", "--config=configs/default.py",
                   "--workdir=/nonexistent/w", "--config.data.pipelin=device"],
     "closest: data.pipeline"),
    ("sweep value", ["-m", "edgepopup_jax.planning.sweep", "--config=configs/default.py",
                     "--workdir=/nonexistent/w", "--parallel_runs=many"], "parallel_runs"),
    ("preflight key", ["-m", "edgepopup_jax.planning.preflight", "--config=configs/default.py",
                       "--target=gpu:h100:1", "--config.optim.learning_rat=1"],
     "closest: optim.learning_rate"),
    ("preflight value", ["-m", "edgepopup_jax.planning.preflight", "--config=configs/default.py",
                         "--target=gpu:h100:1", "--config.num_epochs=ten"], "num_epochs takes a float"),
    ("evaluate key", ["-m", "edgepopup_jax.subnet.evaluate", "--config=configs/default.py",
                      "--workdir=/nonexistent/w", "--config.eval_batch_siz=5"],
     "closest: eval_batch_size"),
    ("check_data key", ["-m", "edgepopup_jax.check_data", "--config=configs/default.py",
                        "--config.data.data_dri=/nonexistent"], "closest: data.data_dir"),
    ("export flag", ["-m", "edgepopup_jax.subnet.export", "--workdr=/nonexistent/w"],
     "Did you mean: workdir"),
    ("export value", ["-m", "edgepopup_jax.subnet.export", "--workdir=/nonexistent/w", "--step=x"],
     "step"),
]


def test_a_mistyped_flag_or_value_is_one_line_and_exit_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {label: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for label, argv, _ in TYPOS}
    for label, _, names in TYPOS:
        out, err = procs[label].communicate(timeout=240)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert procs[label].returncode == 2, (label, err[-2000:])
        assert "Traceback" not in err and len(lines) == 1, (label, err[-2000:])
        assert names in lines[0], (label, lines[0])
