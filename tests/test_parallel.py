"""Many runs in one program (loop.train_group): a run in a group trains as it would alone,
groups resume, a diverging run stops alone, the devices split runs or batches, the sweep groups."""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from edgepopup_jax.configs import default
from edgepopup_jax.training import parallel, sharding
from edgepopup_jax.training import loop
from edgepopup_jax.planning import grid, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Four runs that differ in everything a group allows: seed, keep fraction, weight init, mask
# scope (the global top-k), learning rate, weight decay.
RUNS = ({"seed": 0},
        {"seed": 1, "model.keep_fraction": 0.3},
        {"seed": 2, "model.weight_init": "kaiming_normal", "optim.learning_rate": 0.05,
         "model.mask_scope": "global"},
        {"seed": 3, "model.keep_fraction": 0.7, "optim.weight_decay": 0.0})


def config(**overrides):
    c = default.get_config()
    c.data.pipeline = "device"
    c.num_train_steps = 12
    c.log_every_steps = 1
    c.eval_every_steps = 6
    c.checkpoint_every_steps = 6
    c.batch_size = 64
    c.eval_batch_size = 300  # does not divide the 1,000 eval examples: padding counts for nothing
    return grid.with_overrides(c, overrides)


def losses(result):
    return np.array([h["loss"] for h in result["train_history"]])


def one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def group_of_four(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("group")
    configs = [config(**o) for o in RUNS]
    dirs = [str(workdir / f"run{i}") for i in range(len(RUNS))]
    return configs, dirs, loop.train_group(configs, dirs, devices=one_device())


def assert_same_run(a, b, rtol=1e-5, top1_atol=1e-3):
    assert [h["step"] for h in a["train_history"]] == [h["step"] for h in b["train_history"]]
    np.testing.assert_allclose(losses(a)[0], losses(b)[0], rtol=1e-5)
    np.testing.assert_allclose(losses(a), losses(b), rtol=rtol)
    assert a["eval"]["count"] == b["eval"]["count"] == 1000
    assert abs(a["eval"]["top1"] - b["eval"]["top1"]) <= top1_atol  # 1e-3: one example
    assert a["layers"] == b["layers"]  # the exact kept counts, layer by layer
    assert a["frozen_sha256"] == b["frozen_sha256"]  # bit-identical frozen weights


def test_a_run_in_a_group_trains_as_it_would_alone(group_of_four, tmp_path):
    configs, dirs, results = group_of_four
    assert len({r["frozen_sha256"] for r in results}) == 4
    for i, c in enumerate(configs):
        alone = loop.train_group([c], [str(tmp_path / f"alone{i}")], devices=one_device())[0]
        assert_same_run(results[i], alone)
        assert results[i]["group"]["size"] == 4 and alone["group"]["size"] == 1
        saved = json.loads((pathlib.Path(dirs[i]) / "results.json").read_text())
        assert saved["config"] == json.loads(json.dumps(c.to_dict())) and saved["step"] == 12
    kept = [r["weights_kept"] for r in results]
    assert kept == [133_100, 79_860, 133_100, 186_340]  # 266,200 weights at k = 0.5, 0.3, 0.5, 0.7
    per_layer = [[x["kept"] for x in r["layers"]] for r in results]
    assert per_layer[0] == [117_600, 15_000, 500]  # k = 0.5 in every layer
    assert per_layer[2] != per_layer[0]  # the global top-k: one threshold over all layers


def test_a_stopped_group_resumes_to_the_same_numbers(group_of_four, tmp_path):
    configs, _, results = group_of_four
    dirs = [str(tmp_path / f"run{i}") for i in range(len(configs))]
    part = loop.train_group(configs, dirs, devices=one_device(), stop_after_steps=4)
    assert all(r["preempted"] and r["step"] == 4 for r in part)
    rest = loop.train_group(configs, dirs, devices=one_device())
    for a, b in zip(rest, results):
        assert_same_run(a, b)
        assert a["state_sha256"] == b["state_sha256"]


def test_group_resumes_from_the_newest_step_all_runs_saved(group_of_four, tmp_path):
    """One run saved a step the other did not (killed between the two saves): the group resumes
    from the step both have, the newer one is set aside (not deleted), and the result is exact."""
    configs, _, results = group_of_four
    configs, dirs = configs[:2], [str(tmp_path / f"run{i}") for i in range(2)]
    loop.train_group(configs, dirs, devices=one_device(), stop_after_steps=6)  # saved at 6
    loop.train_group(configs[:1], dirs[:1], devices=one_device(), stop_after_steps=3)  # run 0: 9
    rest = loop.train_group(configs, dirs, devices=one_device())
    aside = [p.name for p in (pathlib.Path(dirs[0]) / "checkpoints").iterdir() if "ahead" in p.name]
    assert len(aside) == 1 and aside[0].startswith("9.")
    for a, b in zip(rest, results[:2]):
        assert_same_run(a, b)


def test_a_diverging_run_stops_alone(tmp_path):
    dense = {"model.mask": "dense", "optim.learning_rate": 0.01}
    configs = [config(**dense), config(**{**dense, "seed": 1, "optim.learning_rate": 1e8})]
    dirs = [str(tmp_path / "ok"), str(tmp_path / "diverges")]
    results = loop.train_group(configs, dirs, devices=one_device())
    assert results[1]["status"] == "diverged" and "diverged at step" in results[1]["message"]
    assert not (pathlib.Path(dirs[1]) / "results.json").exists()
    alone = loop.train_group(configs[:1], [str(tmp_path / "alone")], devices=one_device())[0]
    assert_same_run(results[0], alone)


def test_devices_split_the_runs_or_the_batch(group_of_four, tmp_path):
    configs, _, results = group_of_four
    # Splitting a batch sums its gradients in another order: float reassociation, which can
    # flip a mask entry at the threshold, so later losses agree to 1e-3 (as in test_train).
    for split, shape, rtol in (("runs", {"runs": 4, "data": 2}, 1e-3),
                               ("data", {"runs": 1, "data": 8}, 1e-3)):
        split_configs = [grid.with_overrides(c, {"parallel_split": split}) for c in configs]
        got = loop.train_group(split_configs, [str(tmp_path / split / f"r{i}") for i in range(4)],
                                   devices=jax.devices()[:8])
        for a, b in zip(got, results):
            assert a["group"]["mesh"] == shape
            assert_same_run(a, b, rtol=rtol, top1_atol=5e-3)


def test_configs_that_cannot_share_a_program_are_refused(tmp_path):
    with pytest.raises(parallel.GroupError, match="batch_size"):
        loop.train_group([config(), config(batch_size=32)], [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(parallel.GroupError, match="model.mask "):
        parallel.check_group([config(), config(**{"model.mask": "supermask"})])
    with pytest.raises(ValueError, match="parallel_split"):
        sharding.make_mesh(one_device(), 2, 64, "both")
    with pytest.raises(ValueError, match="a sweep groups its grid points with --parallel_runs"):
        sweep.check_config(config(parallel_runs=3))  # main.py's seeds field, not a sweep's
    assert parallel.pipeline_for(config(state_sharding="fsdp", **{"data.pipeline": "auto"})) == "device"
    assert parallel.pipeline_for(config(**{"data.pipeline": "auto"})) == "device"
    assert not (tmp_path / "a").exists()


def test_sweep_trains_its_grid_in_groups_and_skips_them_when_done(tmp_path):
    base = config(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4, log_every_steps=2)
    base.lock()
    g = grid.Grid((grid.parse_sweep("model.keep_fraction=0.3,0.7", base),
                   grid.parse_sweep("model.weight_init=kaiming_normal,signed_constant", base)), (0, 1))
    lines = []
    rows = sweep.run_sweep_parallel(base, g, str(tmp_path), parallel_runs=3, say=lines.append,
                                    train_group=lambda c, d, say: loop.train_group(
                                        c, d, devices=one_device(), say=say))
    assert any("8 to train in 3 group(s)" in line for line in lines)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["run"] for r in table) == sorted(run.name for run in grid.expand(g))
    for run in grid.expand(g):
        result = json.loads((sweep.run_dir(tmp_path, run) / "results.json").read_text())
        assert result["config"]["seed"] == run.seed and result["step"] == 4
    lines.clear()
    sweep.run_sweep_parallel(base, g, str(tmp_path), parallel_runs=3, say=lines.append,
                             train_group=None)
    assert any("8 finished earlier, 0 to train" in line for line in lines)


# As on the lent GPU images: TensorFlow, tfds and tensorboard are not installed (found by no
# import and by no importlib.util.find_spec, which etils asks).
BLOCK_TENSORFLOW = """
import importlib.machinery, sys
find = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tensorboard"):
        return None
    return find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
sys.argv = ["main.py"] + sys.argv[1:]
sys.path.insert(0, ROOT)
import runpy
try:
    runpy.run_path(MAIN, run_name="__main__")
finally:
    imported = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
    assert not imported, imported
"""


def _main(args, block_tensorflow=False, devices=1):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if block_tensorflow:
        script = BLOCK_TENSORFLOW.replace("ROOT", repr(str(ROOT))).replace("MAIN", repr(str(ROOT / "main.py")))
        cmd = [sys.executable, "-c", script]
    else:
        cmd = [sys.executable, str(ROOT / "main.py")]
    return subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_device_path_trains_the_default_config_without_tensorflow(tmp_path):
    p = _main(["--config=configs/default.py", f"--workdir={tmp_path}", "--config.data.pipeline=device",
               "--config.num_epochs=1"], block_tensorflow=True)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["pipeline"] == "device" and result["eval"]["count"] == 1000
    assert result["eval"]["top1"] > 0.8, result["eval"]
    assert (tmp_path / "checkpoints" / "62").exists()


@pytest.mark.slow
def test_a_group_killed_or_stopped_resumes_as_if_never_interrupted(tmp_path):
    """main.py with parallel_runs=2: SIGTERM (saves, exits 0) and SIGKILL (nothing saved since
    the last checkpoint) each, then the same command again, end where an uninterrupted run does."""
    args = ["--config=configs/default.py", "--config.data.pipeline=device", "--config.parallel_runs=2",
            "--config.num_epochs=2", "--config.log_every_steps=4", "--config.checkpoint_every_steps=20"]

    def run(workdir, stop=None, after="step 44/"):
        p = _main(args + [f"--workdir={workdir}"])
        lines = []
        for line in p.stdout:
            lines.append(line)
            if stop is not None and after in line:
                p.send_signal(stop)
                break
        out = "".join(lines) + p.communicate(timeout=300)[0]
        return p.returncode, out

    rc, out = run(tmp_path / "whole")
    assert rc == 0, out
    whole = [json.loads((tmp_path / "whole" / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    for stop, expect_rc in ((signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)):
        workdir = tmp_path / stop.name
        rc, out = run(workdir, stop)
        assert rc == expect_rc, out
        rc, out = run(workdir)
        assert rc == 0, out
        assert "resumed from step" in out.lower()
        for s, w in zip((0, 1), whole):
            got = json.loads((workdir / f"seed_{s}" / "results.json").read_text())
            assert got["state_sha256"] == w["state_sha256"], (stop.name, s)
            assert got["eval"] == w["eval"]


def test_tensorboard_events_without_tensorflow(tmp_path):
    from edgepopup_jax.training.metric_writer import MetricWriter
    writer = MetricWriter(str(tmp_path), tensorflow=False)
    writer.scalars(1, {"train/loss": 2.5})
    writer.scalars(7, {"train/loss": 1.25, "eval/top1": 0.5})
    writer.close()
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(1, 2.5), (7, 1.25)]
    assert [(s.step, s.value) for s in events.Scalars("eval/top1")] == [(7, 0.5)]


def test_data_that_does_not_fit_the_device_stays_on_the_host_with_the_same_batches(group_of_four, tmp_path):
    """device_memory_fraction too small for the data: it stays in host memory, every step's
    batches are gathered and augmented there and sent; the runs train exactly as with the data
    on the device."""
    configs, _, results = group_of_four
    host = [grid.with_overrides(c, {"data.device_memory_fraction": 1e-9}) for c in configs[:2]]
    lines = []
    got = loop.train_group(host, [str(tmp_path / f"r{i}") for i in range(2)],
                               devices=one_device(), say=lines.append)
    assert any("the data stays in host memory" in line for line in lines)
    for a, b in zip(got, results[:2]):
        assert_same_run(a, b)
        assert a["state_sha256"] == b["state_sha256"]


def test_a_group_keeps_each_layers_own_fraction_with_binary_weights(tmp_path):
    """Issue 18's options on the device path: make_group's kept counts are each layer's own
    (first_last / linear keep fractions), binary-weight runs train, and every run ends with
    exactly those counts."""
    from edgepopup_jax.core import masking
    from edgepopup_jax.training import device_data

    options = {"model.first_last_keep_fraction": 0.8, "model.linear_keep_fraction": 0.2,
               "model.binary_weights": True, "model.score_init": "iterand",
               "num_train_steps": 3, "eval_every_steps": 3, "checkpoint_every_steps": 3}
    configs = [config(seed=0, **options), config(seed=1, **{**options, "model.keep_fraction": 0.3})]
    group = parallel.make_group(configs, device_data.get_info(configs[0].data))
    # FC: fc0 (first), fc1 (linear), head (last): 784x300, 300x100, 100x10
    sizes = (235_200, 30_000, 1_000)
    expected = [masking.kept_count(n, k) for n, k in zip(sizes, (0.8, 0.2, 0.8))]
    np.testing.assert_array_equal(group.hyper["counts"]["layer"], [expected, expected])
    results = loop.train_group(configs, [str(tmp_path / "a"), str(tmp_path / "b")],
                                   devices=one_device())
    for r in results:
        assert np.all(np.isfinite(losses(r)))
        assert [x["kept"] for x in r["layers"]] == expected


def test_a_group_logs_each_runs_learning_rate_as_a_single_run_does(group_of_four):
    """train/learning_rate in each run's TensorBoard events: its own schedule at each step,
    lr(step - 1) as train.py logs it (runs 0 and 2 have learning rates 0.1 and 0.05)."""
    from edgepopup_jax.training import optim
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    configs, dirs, results = group_of_four
    for r in (0, 2):
        events = event_accumulator.EventAccumulator(dirs[r])
        events.Reload()
        logged = [(s.step, s.value) for s in events.Scalars("train/learning_rate")]
        schedule = optim.learning_rate_schedule(configs[r].optim, results[r]["total_steps"],
                                                4000 // 64)  # per-step cosine over 12 steps
        assert [s for s, _ in logged] == list(range(1, 13))
        np.testing.assert_allclose([v for _, v in logged], [float(schedule(s - 1)) for s, _ in logged],
                                   rtol=1e-6)
        assert logged[0][1] == pytest.approx(configs[r].optim.learning_rate, rel=1e-6)
        assert logged[-1][1] < 0.1 * logged[0][1]  # it decays: the test compares a schedule
