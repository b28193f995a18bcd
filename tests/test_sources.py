"""One loop, any source: the follow-ups train from a stream (tf.data), a group of runs shares
one stream, and a run fed the same batches by the device source or by an iterator of numpy
batches trains the same."""
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import masking  # noqa: E402
from edgepopup_jax.planning import grid  # noqa: E402
from edgepopup_jax.subnet import evaluate, export  # noqa: E402
from edgepopup_jax.training import device_data, input_pipeline, loop, sources  # noqa: E402
from tests.test_parallel import assert_same_run, config, losses, one_device  # noqa: E402


def make_folder(root: pathlib.Path) -> None:
    """4 classes x (24 train + 8 test) 16x16 RGB PNGs of seeded noise around a class colour."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label in range(4):
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array([60 * label, 255 - 60 * label, 120], np.float32)
                pixels = np.clip(base + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{label}" / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_folder(root)
    return root


def resnet_on_folder(folder, **overrides):
    """A tiny ResNet on the image folder through tf.data: 96 train images, 6 steps per epoch."""
    return config(**{"data.name": "folder", "data.data_dir": str(folder), "data.pipeline": "tf_data",
                     "data.image_size": 16, "data.augment": "none", "data.mean": (0.5,),
                     "data.std": (0.25,), "data.shuffle_buffer": 96, "model.name": "cifar_resnet18",
                     "model.width": 0.125, "model.stage_sizes": (1, 1), "model.keep_fraction": 0.3,
                     "batch_size": 16, "eval_batch_size": 12, "num_train_steps": 8,
                     "checkpoint_every_steps": 2, "eval_every_steps": 4, "keep_checkpoints": None,
                     "optim.learning_rate": 0.05, **overrides})


FOLLOW_UPS = {
    "iterand": {"model.rerand_every": 3, "model.rerand_rate": 0.2},
    "cosine_schedule": {"model.keep_fraction_anneal_epochs": 6 / 6,
                        "model.keep_fraction_anneal": "cosine"},
    "finetune": {"finetune_epochs": 4 / 6},
}


@pytest.mark.parametrize("follow_up", FOLLOW_UPS)
def test_each_follow_up_trains_from_a_folder_through_tf_data_resumes_and_exports(tmp_path, folder,
                                                                                 follow_up):
    c = resnet_on_folder(folder, **FOLLOW_UPS[follow_up])
    straight = loop.train_and_evaluate(c, str(tmp_path / "straight"), devices=one_device())
    assert straight["pipeline"] == "tf_data" and straight["eval"]["count"] == 32
    assert np.all(np.isfinite(losses(straight)))
    kept = sum(x["kept"] for x in straight["layers"] if x["mode"] == "edge_popup")
    assert kept == sum(masking.kept_count(x["total"], 0.3) for x in straight["layers"]
                       if x["mode"] == "edge_popup")
    assert (straight["iterand"] is not None) == (follow_up == "iterand")
    assert (straight["keep_fraction_schedule"] is not None) == (follow_up == "cosine_schedule")
    assert (straight["finetune"] is not None) == (follow_up == "finetune")

    workdir = str(tmp_path / "resumed")
    first = loop.train_and_evaluate(c, workdir, devices=one_device(), stop_after_steps=5)
    assert first["preempted"] and first["step"] == 5
    resumed = loop.train_and_evaluate(c, workdir, devices=one_device())
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert losses(resumed).tolist() == losses(straight).tolist()

    subnet = tmp_path / "run.subnet"
    export.export(workdir, str(subnet))
    metrics, _ = evaluate.evaluate(c, subnet_path=str(subnet), devices=one_device())
    assert metrics["count"] == 32 and metrics["top1"] == resumed["eval"]["top1"]
    np.testing.assert_allclose(metrics["loss"], resumed["eval"]["loss"], rtol=1e-5)


def test_a_follow_up_on_tf_data_resumes_bit_exactly_after_sigkill(tmp_path, folder):
    """main.py with IteRand from the folder, SIGKILLed once its step-4 checkpoint exists."""
    flags = [f"--config.{k}={v}" for k, v in {
        "data.name": "folder", "data.data_dir": folder, "data.pipeline": "tf_data",
        "data.image_size": 16, "data.augment": "none", "data.shuffle_buffer": 96,
        "model.width": 0.25, "model.keep_fraction": 0.3,
        "model.rerand_every": 3, "batch_size": 16, "eval_batch_size": 12, "num_train_steps": 12,
        "checkpoint_every_steps": 4, "eval_every_steps": 12, "log_every_steps": 1}.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    def main(workdir):
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"),
                                 "--config=configs/cifar10.py:conv4",
                                 f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    solo = main(tmp_path / "solo")
    killed = main(tmp_path / "killed")
    deadline = time.time() + 400
    while not (tmp_path / "killed" / "checkpoints" / "4").is_dir() and time.time() < deadline:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        time.sleep(0.1)
    killed.kill()
    killed.communicate()
    again = main(tmp_path / "killed")
    for proc in (solo, again):
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
    assert "Resumed from step" in err, err[-3000:]
    result = lambda name: json.loads((tmp_path / name / "results.json").read_text())  # noqa: E731
    assert result("killed")["state_sha256"] == result("solo")["state_sha256"]
    assert result("killed")["iterand"]["redraws"] == 4


def test_parallel_runs_on_tf_data_share_one_stream_and_each_equals_its_solo_run(tmp_path):
    c = config(**{"data.pipeline": "tf_data", "parallel_runs": 3, "num_train_steps": 8,
                  "model.rerand_every": 3})
    group = loop.train_config(c, str(tmp_path / "group"), devices=one_device())
    assert [r["group"]["size"] for r in group] == [3, 3, 3]
    assert len({r["state_sha256"] for r in group}) == 3  # the seeds still differ in their weights
    info = input_pipeline.get_info(c.data)
    stream = sources.IteratorSource(  # seed 0's stream, which the group's runs shared
        info, lambda start: input_pipeline.train_iterator(c.data, batch_size=c.batch_size, seed=0,
                                                          start_step=start),
        lambda: input_pipeline.eval_iterator(c.data, batch_size=c.eval_batch_size))
    for s, in_group in zip((0, 1, 2), group):
        solo = loop.train_and_evaluate(grid.with_overrides(c, {"seed": s, "parallel_runs": 1}),
                                       str(tmp_path / f"solo{s}"), devices=one_device(), source=stream)
        assert_same_run(in_group, solo)  # a vmap over 3 runs may round differently than over 1


def device_batches(c, start: int):
    """The batches the device source gathers for a run of config c, as numpy, from `start`."""
    images, labels = device_data.load_split(c.data, c.data.train_split)
    steps_per_epoch = len(labels) // c.batch_size
    for step in itertools.count(start):
        epoch, index = divmod(step, steps_per_epoch)
        permutation = device_data.epoch_permutation(c.seed, epoch, len(labels))
        yield jax.device_get(device_data.train_batch(images, labels, permutation, c.seed, epoch,
                                                     index, c.batch_size, c.data.augment))


def test_one_run_two_sources_one_answer(tmp_path):
    """The device source and an iterator of the same batches as numpy: the same loss at every
    step, the same state, the same evaluation."""
    c = config(**{"num_train_steps": 10, "model.rerand_every": 4})
    device = loop.train_and_evaluate(c, str(tmp_path / "device"), devices=one_device())
    images, labels = device_data.load_split(c.data, c.data.eval_split)
    eval_data = device_data.eval_batches(images, labels, c.eval_batch_size)
    own = sources.IteratorSource(
        device_data.get_info(c.data), lambda start: device_batches(c, start),
        lambda: ({k: v[i] for k, v in eval_data.items()} for i in range(len(eval_data["label"]))))
    mine = loop.train_and_evaluate(c, str(tmp_path / "iterator"), devices=one_device(), source=own)
    assert device["pipeline"] == "device" and mine["pipeline"] == "iterator"
    np.testing.assert_array_equal(losses(mine), losses(device))
    assert mine["state_sha256"] == device["state_sha256"]
    assert mine["eval"] == device["eval"]


def test_a_stream_whose_batch_does_not_split_over_the_devices_is_refused():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4), ("runs", "data"))
    with pytest.raises(ValueError, match="batch_size 30 cannot be split over the 4 devices of the "
                                         "data axis: use a positive multiple of 4"):
        sources.stream_source(config().data, batch_size=30, eval_batch_size=100, seed=0, mesh=mesh,
                              bad=input_pipeline.BadExamples(config().data))


def test_the_device_source_gathers_each_runs_batch_by_its_own_seed():
    """The step's gather (vmapped over the runs) equals each run's batch gathered alone."""
    c = config()
    images, labels = device_data.load_split(c.data, c.data.train_split)
    seeds, step, steps_per_epoch = np.array([3, 5], np.int32), 70, len(labels) // c.batch_size
    epoch, index = divmod(step, steps_per_epoch)
    permutations = np.stack([device_data.epoch_permutation(s, epoch, len(labels)) for s in seeds])
    both = sources.gather_batches(images, labels, permutations, seeds, step,
                                  steps_per_epoch=steps_per_epoch, batch_size=c.batch_size,
                                  augment="cifar")
    for r, s in enumerate(seeds):
        alone = device_data.train_batch(images, labels, permutations[r], s, epoch, index,
                                        c.batch_size, "cifar")
        np.testing.assert_array_equal(both["image"][r], alone["image"])
        np.testing.assert_array_equal(both["label"][r], alone["label"])
    assert not np.array_equal(both["label"][0], both["label"][1])
