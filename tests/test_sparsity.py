"""Sparsity schedules: k annealed from a start to keep_fraction, exact counts at every step."""
import math
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import masking  # noqa: E402
from edgepopup_jax.subnet import export  # noqa: E402
from edgepopup_jax.training import parallel, sparsity, train  # noqa: E402
from edgepopup_jax.training import loop
from tests.test_parallel import config, losses, one_device  # noqa: E402

FC_SIZES = (784 * 300, 300 * 100, 100 * 10)  # the default FC's score arrays, in selection order


def model_config(**fields):
    return ml_collections.ConfigDict({"keep_fraction": 0.3, "mask": "edge_popup", **fields})


@pytest.mark.parametrize("anneal, step, expected", [
    ("linear", 0, 1.0), ("linear", 2, 1.0 - 0.7 * 0.2), ("linear", 5, 0.65), ("linear", 10, 0.3),
    ("linear", 99, 0.3),
    ("cosine", 0, 1.0), ("cosine", 2, 0.3 + 0.35 * (1 + math.cos(0.2 * math.pi))),
    ("cosine", 5, 0.65), ("cosine", 10, 0.3),
])
def test_the_schedules_k_at_chosen_steps(anneal, step, expected):
    s = sparsity.schedule(model_config(keep_fraction_anneal_epochs=2.0, keep_fraction_anneal=anneal), 5)
    assert s.steps == 10
    assert s.keep_fraction(step) == pytest.approx(expected, abs=1e-12)


def test_no_schedule_by_default():
    s = sparsity.schedule(model_config(), 100)
    assert not s.active and s.keep_fraction(0) == 0.3


@pytest.mark.parametrize("fields, message", [
    ({"keep_fraction_anneal": "step"}, "keep_fraction_anneal 'step'; allowed: linear, cosine"),
    ({"keep_fraction_anneal_epochs": -1}, "keep_fraction_anneal_epochs must be a number >= 0"),
    ({"keep_fraction_start": 1.5}, "keep_fraction_start must be in (0, 1]"),
    ({"keep_fraction_anneal_epochs": 1, "keep_fraction_start": 0.2},
     "keep_fraction_start (0.2) is below model.keep_fraction (0.3)"),
    ({"keep_fraction_anneal_epochs": 1, "mask": "supermask"},
     "keep_fraction_anneal_epochs (1) needs model.mask='edge_popup'"),
])
def test_bad_schedules_are_refused_naming_the_fields(fields, message):
    with pytest.raises(ValueError) as e:
        sparsity.check(model_config(**fields))
    assert message in str(e.value)


def annealed(**overrides):
    """The default FC, k from 1.0 to 0.3 over the first 6 of 12 steps (62 steps per epoch)."""
    return config(**{"model.keep_fraction": 0.3, "model.keep_fraction_anneal_epochs": 6 / 62,
                     **overrides})


def test_the_groups_counts_are_each_steps_exact_counts(tmp_path):
    from edgepopup_jax.training import device_data
    info = device_data.get_info(annealed().data, str(tmp_path))
    group = parallel.make_group([annealed(), annealed(**{"model.keep_fraction": 0.5}),
                                 annealed(**{"model.keep_fraction_anneal": "cosine"})], info)
    assert group.sizes == FC_SIZES and group.annealing_steps == 6
    for step in (0, 1, 3, 5, 6, 11):
        got = group.counts(step)["layer"]
        for r, schedule in enumerate(group.schedules):
            k = schedule.keep_fraction(step)
            assert got[r].tolist() == [masking.kept_count(n, k) for n in FC_SIZES]
    assert group.counts(0)["layer"][0].tolist() == list(FC_SIZES)  # k = 1.0: all kept
    assert group.counts(3)["layer"][0].tolist() == [masking.kept_count(n, 0.65) for n in FC_SIZES]


def test_a_scheduled_run_takes_each_steps_k_and_resumes_bit_exactly(tmp_path):
    dense_first = loop.train_group([config(**{"model.keep_fraction": 1.0})], [str(tmp_path / "k1")],
                                       devices=one_device())[0]
    fixed = loop.train_group([config(**{"model.keep_fraction": 0.3})], [str(tmp_path / "k03")],
                                 devices=one_device())[0]
    straight = loop.train_group([annealed()], [str(tmp_path / "straight")], devices=one_device())[0]
    # Step 1 runs at k = 1.0, as a run that keeps everything; later steps at smaller k differ.
    assert losses(straight)[0] == losses(dense_first)[0]
    assert losses(straight)[1] != losses(dense_first)[1]
    assert not np.allclose(losses(straight)[:6], losses(fixed)[:6])
    ks = [h["keep_fraction"] for h in straight["train_history"]]
    assert ks == pytest.approx([1.0 - 0.7 * s / 6 if s < 6 else 0.3 for s in range(1, 13)])
    assert straight["keep_fraction_schedule"]["final"] == 0.3
    assert straight["weights_kept"] == sum(masking.kept_count(n, 0.3) for n in FC_SIZES)

    workdir = str(tmp_path / "resumed")
    part = loop.train_group([annealed()], [workdir], devices=one_device(), stop_after_steps=3)[0]
    # Stopped mid-anneal: the kept counts checked and reported are those of step 3's k.
    assert [layer["kept"] for layer in part["layers"]] == [masking.kept_count(n, 0.65) for n in FC_SIZES]
    name, options, _, meta = export.training_variables(workdir)
    assert meta["keep_fraction"] == pytest.approx(0.65) and options["keep_fraction"] == pytest.approx(0.65)
    assert "keep_fraction_anneal_epochs" not in options
    rest = loop.train_group([annealed()], [workdir], devices=one_device())[0]
    assert rest["state_sha256"] == straight["state_sha256"]
    assert losses(rest).tolist() == losses(straight).tolist()


def test_a_constant_schedule_is_the_fixed_keep_fraction(tmp_path):
    fixed = loop.train_group([config(**{"model.keep_fraction": 0.3})], [str(tmp_path / "a")],
                                 devices=one_device())[0]
    constant = loop.train_group([annealed(**{"model.keep_fraction_start": 0.3})],
                                    [str(tmp_path / "b")], devices=one_device())[0]
    assert constant["state_sha256"] == fixed["state_sha256"]
