"""export (training checkpoint -> .subnet) and evaluate (subnet or checkpoint) end to end."""
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.configs import default  # noqa: E402
from edgepopup_jax.training import train  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.subnet import evaluate, export  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    c = default.get_config()
    c.num_train_steps = 30
    c.model.weight_init = "kaiming_normal"
    c.model.keep_fraction = 0.3
    results = loop.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
    return c, workdir, results


def test_export_then_evaluate_gives_the_trainers_numbers(trained, tmp_path):
    c, workdir, results = trained
    stats = export.export(str(workdir), str(tmp_path / "fc.subnet"))
    assert stats["kept_per_layer"] == {l["name"]: l["kept"] for l in results["layers"]}
    for source in ({"subnet_path": str(tmp_path / "fc.subnet")}, {"workdir": str(workdir)}):
        metrics, rows = evaluate.evaluate(c, devices=jax.devices()[:1], **source)
        assert metrics == results["eval"], source
        assert [(r.name, r.total, r.kept) for r in rows] == \
            [(l["name"], l["total"], l["kept"]) for l in results["layers"]]


def test_evaluate_needs_exactly_one_source(trained, tmp_path):
    c, workdir, _ = trained
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.evaluate(c, subnet_path=str(tmp_path / "fc.subnet"), workdir=str(workdir))
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.evaluate(c)


def test_command_line_tools(trained, tmp_path):
    _, workdir, results = trained
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = tmp_path / "cli.subnet"
    subprocess.run([sys.executable, "-m", "edgepopup_jax.subnet.export", f"--workdir={workdir}",
                    f"--out={out}"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert out.exists()
    p = subprocess.run([sys.executable, "-m", "edgepopup_jax.subnet.evaluate", f"--subnet={out}",
                        "--config=configs/default.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert f"top-1 {results['eval']['top1']:.4f}" in p.stdout
    assert "total" in p.stdout
    p = subprocess.run([sys.executable, "-m", "edgepopup_jax.subnet.export",
                        f"--workdir={tmp_path}/none", f"--out={tmp_path}/x.subnet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "no checkpoint" in p.stderr
    assert not (tmp_path / "x.subnet").exists()
