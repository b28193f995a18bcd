"""Where the train state lives: replicated, or split over the devices (state_sharding="fsdp")."""
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.configs import default  # noqa: E402
from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop  # noqa: E402
from edgepopup_jax.training import input_pipeline, sharding  # noqa: E402
from edgepopup_jax.training import step as step_lib  # noqa: E402
from edgepopup_jax.planning import grid  # noqa: E402


def _specs(shapes: dict, num_devices: int, mode: str) -> dict:
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    abstract = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
    return {k: v.spec for k, v in sharding.state_shardings(abstract, mesh, mode).items()}


def test_fsdp_splits_each_large_array_on_its_largest_divisible_dimension():
    shapes = {"fc0": (784, 300), "fc1": (300, 100), "conv": (3, 3, 64, 128), "tie": (64, 64),
              "head": (100, 10), "step": (), "rng": (2,)}
    assert _specs(shapes, 4, "fsdp") == {
        "fc0": PartitionSpec("data", None),  # both divide by 4: the larger
        "fc1": PartitionSpec("data", None),
        "conv": PartitionSpec(None, None, None, "data"),
        "tie": PartitionSpec("data", None),  # equal sizes: the first
        "head": PartitionSpec(),  # 1,000 elements: below FSDP_MIN_SIZE
        "step": PartitionSpec(), "rng": PartitionSpec()}
    on_8 = _specs(shapes, 8, "fsdp")
    assert on_8["fc0"] == PartitionSpec("data", None)  # 784 = 8 x 98; 300 is not a multiple
    assert on_8["fc1"] == PartitionSpec()  # neither 300 nor 100 divides by 8
    assert set(_specs(shapes, 8, "replicated").values()) == {PartitionSpec()}
    assert set(_specs(shapes, 1, "fsdp").values()) == {PartitionSpec()}
    with pytest.raises(ValueError, match="unknown state_sharding 'zero3'; allowed: replicated, fsdp"):
        _specs(shapes, 4, "zero3")


def _config(**overrides):
    c = default.get_config()
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 1, 3
    c.eval_every_steps, c.batch_size, c.eval_batch_size = 3, 32, 200
    return grid.with_overrides(c, overrides)


@pytest.mark.parametrize("num_devices", [8])
def test_fsdp_state_is_split_and_trains_resumes_and_evaluates_as_the_replicated_state(
        tmp_path, num_devices):
    devices = jax.devices()[:num_devices]
    config = _config(state_sharding="fsdp")
    info = input_pipeline.get_info(config.data)
    init, train_step = step_lib.run_of_one(config, info, devices)
    state = init(config.seed)
    scores = state.params["fc0"]["scores"]  # (784, 300): each device holds 1/num_devices
    assert scores.sharding.spec == PartitionSpec("data", None)
    assert {s.data.shape for s in scores.addressable_shards} == {(784 // num_devices, 300)}
    assert state.frozen["fc0"]["kernel"].sharding.spec == PartitionSpec("data", None)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (784, 300)]
    assert moments and all(x.sharding.spec == PartitionSpec("data", None) for x in moments)
    assert state.params["head"]["scores"].sharding.spec == PartitionSpec()  # small: replicated
    batch = next(input_pipeline.train_iterator(config.data, batch_size=32, seed=0))
    after, _ = train_step(state, batch)
    assert after.params["fc0"]["scores"].sharding.is_equivalent_to(scores.sharding, 2)  # still split

    replicated = loop.train_and_evaluate(_config(), str(tmp_path / "replicated"), devices=devices)
    stopped = loop.train_and_evaluate(config, str(tmp_path / "fsdp"), devices=devices,
                                       stop_after_steps=3)
    assert stopped["preempted"] and stopped["step"] == 3
    resumed = loop.train_and_evaluate(config, str(tmp_path / "fsdp"), devices=devices)
    assert resumed["step"] == 6
    # The frozen weights are the same bits; training matches within float tolerance (a split
    # state may let XLA order some sums differently).
    assert resumed["frozen_sha256"] == replicated["frozen_sha256"]
    np.testing.assert_allclose([h["loss"] for h in resumed["train_history"]],
                               [h["loss"] for h in replicated["train_history"]], rtol=1e-5)
    for a, b in zip(resumed["eval_history"], replicated["eval_history"]):
        assert a["step"] == b["step"] and a["count"] == b["count"] == 1000
        assert abs(a["top1"] - b["top1"]) <= 0.002 and abs(a["loss"] - b["loss"]) < 1e-4
    assert resumed["weights_kept"] == replicated["weights_kept"] == 133_100
    # A replicated run's checkpoint resumes with the state split (and is the same run).
    loop.train_and_evaluate(_config(), str(tmp_path / "switched"), devices=devices,
                             stop_after_steps=3)
    switched = loop.train_and_evaluate(config, str(tmp_path / "switched"), devices=devices)
    np.testing.assert_allclose([h["loss"] for h in switched["train_history"]],
                               [h["loss"] for h in replicated["train_history"]], rtol=1e-5)
    # The checkpoint holds the whole state, readable on one device (as export reads it).
    saved, _ = ckpt_lib.Checkpointer(str(tmp_path / "fsdp" / "checkpoints")).restore_raw()
    assert saved["params"]["fc0"]["scores"].shape == (784, 300)
