"""Sweeps: the grid, resuming and skipping, workers, bad specs, the table and the figure."""
import csv
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from edgepopup_jax.configs import default
from edgepopup_jax.training import train
from edgepopup_jax.training import loop
from edgepopup_jax.planning import grid as grid_lib
from edgepopup_jax.planning import paper_figures, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_default():
    config = default.get_config()
    config.num_epochs = 1.0
    config.log_every_steps = 31
    config.lock()
    return config


def two_by_two(config):
    return grid_lib.Grid((grid_lib.parse_sweep("model.keep_fraction=0.3,0.7", config),
                          grid_lib.parse_sweep("model.weight_init=kaiming_normal,signed_constant", config)),
                         (0,))


def test_sweep_stops_resumes_skips_and_tabulates(tmp_path):
    config, lines = small_default(), []
    grid = two_by_two(config)
    one_device = functools.partial(loop.train_and_evaluate, devices=jax.devices()[:1])

    # Killed during its first run: the trainer saves a checkpoint at step 20 and the sweep stops.
    with pytest.raises(sweep.Stopped, match="rerun the same command"):
        sweep.run_sweep(config, grid, str(tmp_path), say=lines.append,
                        train_fn=functools.partial(one_device, stop_after_steps=20))
    first = grid_lib.expand(grid)[0]
    assert sweep.latest_checkpoint(sweep.run_dir(tmp_path, first)) == 20

    # Rerun: that run resumes from its checkpoint, the others train.
    lines.clear()
    rows = sweep.run_sweep(config, grid, str(tmp_path), say=lines.append, train_fn=one_device)
    assert any(f"{first.name}: resuming from step 20" in line for line in lines)
    assert sum(": training" in line for line in lines) == 3
    assert len(rows) == 4
    table = list(csv.DictReader(open(tmp_path / sweep.TABLE_FILE)))
    assert [(r["model.keep_fraction"], r["model.weight_init"]) for r in table] == [
        ("0.3", "kaiming_normal"), ("0.3", "signed_constant"), ("0.7", "kaiming_normal"),
        ("0.7", "signed_constant")]
    for row, run in zip(table, grid_lib.expand(grid)):
        results = json.loads((sweep.run_dir(tmp_path, run) / "results.json").read_text())
        assert results["config"]["model"]["keep_fraction"] == float(row["model.keep_fraction"])
        assert float(row["top1"]) == results["eval"]["top1"] and float(row["top5"]) == results["eval"]["top5"]
        assert int(row["weights_kept"]) == results["weights_kept"] and int(row["steps"]) == 62
        assert row["status"] == "ok" and results["step"] == results["total_steps"] == 62
    assert len({r["top1"] for r in table}) > 1  # four different runs, not one result copied
    png = (tmp_path / sweep.FIGURE_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / sweep.FIGURE_FILE)
    assert image.ndim == 3 and image.shape[0] > 200 and np.ptp(image) > 0

    # Rerun again: every run is skipped, nothing trains, the table is the same.
    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    lines.clear()
    again = sweep.run_sweep(config, grid, str(tmp_path), say=lines.append, train_fn=must_not_train)
    assert again == rows and sum("skipped" in line for line in lines) == 4

    # --plot_only redraws from the workdir alone.
    (tmp_path / sweep.FIGURE_FILE).unlink()
    loaded_grid, loaded_config = sweep.load_grid(tmp_path)
    assert loaded_grid == grid
    sweep.write_outputs(tmp_path, loaded_grid, sweep.collect(tmp_path, loaded_grid, loaded_config))
    assert (tmp_path / sweep.FIGURE_FILE).read_bytes()[:4] == b"\x89PNG"

    # The same workdir with another recipe is refused, not mixed in.
    other = small_default().unlock()
    other.num_epochs = 2.0
    with pytest.raises(ValueError, match="another config .*num_epochs"):
        sweep.run_sweep(other, grid, str(tmp_path), say=lines.append, train_fn=must_not_train)
    assert sweep.load_grid(tmp_path)[1].num_epochs == 1.0  # the sweep's record is left as it was


def fake_train(config, workdir, calls):
    """Writes what a finished run writes, as the trainer would, without training."""
    calls.append(pathlib.Path(workdir).name)
    results = {"config": config.to_dict(), "preempted": False, "step": 1, "total_steps": 1,
               "eval": {"top1": config.model.keep_fraction, "top5": 1.0},
               "weights_kept": 1, "weights_total": 2, "wall_time_sec": 0.0}
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / "results.json").write_text(json.dumps(results))
    return results


def test_workers_split_the_grid_without_overlap(tmp_path):
    config = small_default()
    grid = grid_lib.Grid((grid_lib.parse_sweep("model.keep_fraction=0.1,0.3,0.5,0.7,0.9", config),
                          grid_lib.parse_sweep("model.weight_init=kaiming_normal,signed_constant", config)),
                         (0, 1), {"model.mask": "dense"}, ("model.weight_init",))
    runs = grid_lib.expand(grid)
    assert len(runs) == 5 * 2 * 2 + 2 * 2 and len({r.name for r in runs}) == len(runs)
    calls = {w: [] for w in range(3)}
    for w in range(3):
        sweep.run_sweep(config, grid, str(tmp_path), worker=w, num_workers=3, say=lambda s: None,
                        train_fn=functools.partial(fake_train, calls=calls[w]))
    names = [n for w in range(3) for n in calls[w]]
    assert sorted(names) == sorted(r.name for r in runs)  # each run exactly once
    assert calls[1] == [r.name for r in runs[1::3]]
    rows = sweep.collect(tmp_path, grid, config)
    assert len(rows) == len(runs) and sum(r["baseline"] for r in rows) == 4
    baseline = next(r for r in rows if r["baseline"])
    assert "model.keep_fraction" not in baseline and baseline["model.weight_init"] == "kaiming_normal"
    with pytest.raises(ValueError, match="0 <= worker < num_workers"):
        grid_lib.for_worker(runs, 3, 3)


@pytest.mark.parametrize("spec, message", [
    ("model.keep_fractions=0.1,0.5", "unknown config key 'model.keep_fractions': model has no field"),
    ("optimizer.learning_rate=0.1", "the config has no field 'optimizer'; it has: batch_size"),
    ("model.keep_fraction=0.1,abc", "bad value 'abc' for model.keep_fraction: expected a finite float"),
    ("model.dense_first=yes", "expected true or false"),
    ("batch_size=64.5", "bad value '64.5' for batch_size: expected an int"),
    ("model.keep_fraction", "expected KEY=V1,V2"),
    ("model.keep_fraction=0.1,0.1", "repeats a value"),
    ("data.mean=0.5", "only bool, int, float and str fields can be swept"),
    ("seed=0,1", "--seeds"),
])
def test_bad_sweep_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid_lib.parse_sweep(spec, small_default())


def test_a_value_the_model_refuses_fails_before_any_run(tmp_path):
    config = small_default()
    grid = grid_lib.Grid((grid_lib.parse_sweep("model.keep_fraction=0.5,1.5", config),), (0,))
    with pytest.raises(ValueError, match="run model.keep_fraction=1.5,seed=0: .*keep_fraction"):
        sweep.run_sweep(config, grid, str(tmp_path), say=lambda s: None,
                        train_fn=functools.partial(fake_train, calls=[]))
    assert not (tmp_path / "runs").exists()


def test_cli_bad_spec_is_a_clear_error(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "edgepopup_jax.planning.sweep",
                           f"--config={ROOT / 'configs/default.py'}", f"--workdir={tmp_path}",
                           "--sweep=model.weight_inti=kaiming_normal"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown config key 'model.weight_inti'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", list(paper_figures.FIGURES))
def test_paper_figures_expand_to_valid_runs(name):
    figure = paper_figures.FIGURES[name]
    base = grid_lib.with_overrides(figure.config(), figure.fixed)
    runs = grid_lib.expand(figure.grid)
    sizes = [len(d.points) for d in figure.grid.dims]
    baselines = [len(d.points) for d in figure.grid.dims if d.label in figure.grid.baseline_over]
    assert len(runs) == (np.prod(sizes) + np.prod(baselines)) * len(figure.grid.seeds)
    for run in runs:
        config = grid_lib.with_overrides(base, run.overrides)
        sweep.check_config(config)
        if run.baseline:
            assert config.model.mask == "dense"
        else:
            assert config.model.mask == "edge_popup"
    assert any(r.baseline for r in runs)


def test_followups_figure_plans_its_runs_and_groups():
    """--figure=followups: Conv6 at k in {0.1, 0.3, 0.5} x {EP, Global EP, EP + IteRand, biprop}
    x 5 seeds + 5 dense baselines; every config passes the trainer's start-up checks, and the
    sweep's --parallel_runs grouping forms groups that parallel.make_group accepts."""
    from edgepopup_jax.training import input_pipeline, parallel
    figure = paper_figures.FIGURES["followups"]
    base = grid_lib.with_overrides(figure.config(), figure.fixed)
    assert base.model.name == "conv6" and base.data.pipeline == "device"
    assert base.num_epochs == 100 and base.optim.learning_rate == 0.1 and base.batch_size == 128
    runs = grid_lib.expand(figure.grid)
    assert len(runs) == 3 * 4 * 5 + 5
    methods = {r.labels["method"]: {k: v for k, v in r.overrides.items()
                                    if k not in ("seed", "model.keep_fraction")}
               for r in runs if not r.baseline}
    assert methods == {"EP": {}, "GlobalEP": {"model.mask_scope": "global"},
                       "EP+IteRand": {"model.rerand_every": 300, "model.rerand_rate": 0.1,
                                      "model.rerand_mode": "bernoulli"},
                       "biprop": {"model.binary_weights": True}}
    assert sorted({r.overrides["model.keep_fraction"] for r in runs if not r.baseline}) == [0.1, 0.3, 0.5]
    assert sorted(r.seed for r in runs if r.baseline) == list(paper_figures.CIFAR_SEEDS)
    assert "BatchNorm" in figure.description  # why EP + learned BN is not a line
    configs = {r.name: grid_lib.with_overrides(base, r.overrides) for r in runs}
    info = input_pipeline.DatasetInfo(10, (32, 32, 3), 50_000, 10_000)
    groups = sweep._groups(runs, configs, 50)
    assert sorted(len(g) for g in groups) == [5, 15, 15, 30]  # EP + Global EP share a program
    for group in groups:
        parallel.make_group([configs[r.name] for r in group], info)  # train.make_plan for each
    assert len(sweep._groups(runs, configs, 8)) == 9
