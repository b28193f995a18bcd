"""Prune, then fine-tune: the mask fixed, only the kept weights train; resumable; exported."""
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import selection  # noqa: E402
from edgepopup_jax.subnet import evaluate, export  # noqa: E402
from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.training import parallel, train  # noqa: E402
from tests.test_parallel import config, losses, one_device  # noqa: E402


def tuned(**overrides):
    """The default FC at k = 0.3: 8 steps of scores, then 4 of fine-tuning (62 steps per epoch)."""
    return config(**{"num_train_steps": 8, "finetune_epochs": 4 / 62, "model.keep_fraction": 0.3,
                     "model.weight_init": "kaiming_normal", "checkpoint_every_steps": 2,
                     "keep_checkpoints": None, **overrides})


def _state(workdir, step):
    checkpointer = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"))
    state, _ = checkpointer.restore_raw(step)
    checkpointer.close()
    return state


def test_fine_tuning_trains_only_the_kept_weights_and_exports_them(tmp_path):
    workdir = str(tmp_path / "run")
    result = loop.train_group([tuned()], [workdir], devices=one_device())[0]
    assert result["step"] == result["total_steps"] == 12
    assert result["finetune"]["steps"] == 4 and result["finetune"]["from_step"] == 8
    before, after = _state(workdir, 8), _state(workdir, 12)
    for layer in before["params"]:  # the scores no longer train: the mask is fixed
        np.testing.assert_array_equal(after["params"][layer]["scores"], before["params"][layer]["scores"])
    masks = selection.edge_popup_masks(before["params"], 0.3)
    moved = 0
    for layer in before["frozen"]:
        kept = np.asarray(masks[layer]["scores"]) > 0
        w0, w1 = before["frozen"][layer]["kernel"], after["frozen"][layer]["kernel"]
        np.testing.assert_array_equal(w1[~kept], w0[~kept])  # pruned: bit-identical
        moved += int(np.sum(w1[kept] != w0[kept]))
        assert np.mean(w1[kept] != w0[kept]) > 0.9, layer  # kept: trained
    assert moved > 0
    assert result["eval"]["loss"] != result["finetune"]["eval_before"]["loss"]
    assert np.all(np.isfinite(losses(result)))

    subnet = tmp_path / "run.subnet"
    export.export(workdir, str(subnet))  # carries the fine-tuned weights
    metrics, _ = evaluate.evaluate(tuned(), subnet_path=str(subnet), devices=one_device())
    assert metrics["top1"] == result["eval"]["top1"] and metrics["count"] == 1000
    np.testing.assert_allclose(metrics["loss"], result["eval"]["loss"], rtol=1e-5)


@pytest.mark.parametrize("stop_after", [8, 10])  # at the boundary, and mid-fine-tuning
def test_fine_tuning_resumes_bit_exactly(tmp_path, stop_after):
    straight = loop.train_group([tuned()], [str(tmp_path / "a")], devices=one_device())[0]
    loop.train_group([tuned()], [str(tmp_path / "b")], devices=one_device(),
                         stop_after_steps=stop_after)
    resumed = loop.train_group([tuned()], [str(tmp_path / "b")], devices=one_device())[0]
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert losses(resumed).tolist() == losses(straight).tolist()


@pytest.mark.parametrize("overrides, fields", [
    ({"finetune_epochs": -1.0}, ("finetune_epochs",)),
    ({"model.mask": "dense"}, ("finetune_epochs", "model.mask")),
    ({"model.binary_weights": True}, ("finetune_epochs", "model.binary_weights")),
])
def test_bad_fine_tuning_is_refused_naming_the_fields(tmp_path, overrides, fields):
    with pytest.raises(ValueError) as e:
        loop.train_group([tuned(**overrides)], [str(tmp_path / "run")], devices=one_device())
    assert all(f in str(e.value) for f in fields), str(e.value)


def test_a_pruned_weight_moved_by_fine_tuning_is_caught(tmp_path, monkeypatch):
    """Without the update mask, weight decay moves the pruned weights: the run says so."""
    from edgepopup_jax.training import finetune
    monkeypatch.setattr(finetune, "masked", lambda tree, mask: tree)
    with pytest.raises(RuntimeError, match="fine-tuning changed a weight its mask prunes"):
        loop.train_group([tuned()], [str(tmp_path / "run")], devices=one_device())
