"""Checkpoint meta across versions: options added since a checkpoint was written."""
import jax.numpy as jnp
import numpy as np
import pytest

from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import iterand

# A ResNet run's model meta as written before mask_scope and bn_running_var existed.
OLD_RESNET = {"name": "cifar_resnet18", "keep_fraction": 0.5, "mask": "edge_popup",
              "weight_init": "kaiming_normal"}
# The options issue 18 added, with the value every older run had (each one off).
ISSUE18_OFF = {"binary_weights": False, "score_init": "kaiming_uniform", "score_init_scale": 1.0,
               "first_last_keep_fraction": None, "linear_keep_fraction": None, "bn_affine": None}


def resume(directory, state, model_options):
    """The trainer's resume check: this run's model options, with the added options' defaults."""
    expected = {"model": {**ckpt_lib.ADDED_MODEL_OPTIONS, **model_options}, "seed": 0}
    checkpointer = ckpt_lib.Checkpointer(str(directory))
    try:
        return checkpointer.restore(state, expected, added_defaults={"model": ckpt_lib.ADDED_MODEL_OPTIONS})
    finally:
        checkpointer.close()


def test_an_older_resnet_checkpoint_resumes_only_with_the_running_variance_it_had(tmp_path):
    state = {"scores": jnp.arange(6.0).reshape(2, 3)}
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, state, {"model": OLD_RESNET, "seed": 0}, force=True)
    checkpointer.close()
    # Today's ResNet configs update BN's running variance unbiased: not what the old run did.
    with pytest.raises(ckpt_lib.CheckpointError, match='belongs to another run .*"bn_running_var": "biased"'):
        resume(tmp_path, state, {**OLD_RESNET, "mask_scope": "layer", "bn_running_var": "unbiased"})
    # With --config.model.bn_running_var=biased (and without the new fields at all) it resumes.
    for options in ({**OLD_RESNET, "bn_running_var": "biased"}, OLD_RESNET):
        restored, meta = resume(tmp_path, state, options)
        np.testing.assert_array_equal(restored["scores"], state["scores"])
        assert meta["model"]["bn_running_var"] == "biased" and meta["model"]["mask_scope"] == "layer"


def test_run_meta_reads_every_version():
    """A version-1 meta (no format, checksum, process_count or history; a model without the
    added options) reads with the documented defaults; a current one round-trips."""
    v1 = {"model": OLD_RESNET, "seed": 3, "dataset": "cifar10", "batch_size": 128, "num_classes": 10}
    meta = ckpt_lib.RunMeta.from_json(v1)
    assert meta.model == OLD_RESNET and meta.process_count is None
    assert meta.history == {"train": [], "eval": [], "throughput": []}
    current = {**v1, "model": meta.model, "process_count": 2,
               "history": {"train": [{"step": 5, "loss": 1.5, "accuracy": 0.5}], "eval": [],
                           "throughput": [100.0]}, "keep_fraction": 0.65}
    assert ckpt_lib.RunMeta.from_json(v1).keep_fraction is None
    assert ckpt_lib.RunMeta.from_json({**current, "format": 2, "checksum": [1]}).to_json() == current
    # What a resumed run must match: the identity fields, model options completed the same way.
    assert meta.identity() == {"model": {**OLD_RESNET, "mask_scope": "layer", "bn_running_var": "biased",
                                         **ISSUE18_OFF, "keep_fraction_start": 1.0,
                                         "keep_fraction_anneal_epochs": 0.0, "keep_fraction_anneal": "linear",
                                         **iterand.DEFAULTS},
                               "seed": 3, "dataset": "cifar10", "batch_size": 128}


def test_a_checkpoint_from_before_issue_18_resumes_with_its_options_off(tmp_path):
    """Today's config (the new options at their defaults) resumes an older run; turning one of
    them on is another run."""
    from edgepopup_jax.configs import cifar10

    old = {**OLD_RESNET, "mask_scope": "layer", "bn_running_var": "biased"}
    state = {"scores": jnp.arange(6.0).reshape(2, 3)}
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, state, {"model": old, "seed": 0}, force=True)
    checkpointer.close()
    today = cifar10.get_config("cifar_resnet18").model.to_dict()
    assert {k: today[k] for k in ISSUE18_OFF} == ISSUE18_OFF
    restored, meta = resume(tmp_path, state, {**old, **ISSUE18_OFF})
    np.testing.assert_array_equal(restored["scores"], state["scores"])
    for on in ({"binary_weights": True}, {"bn_affine": True}, {"first_last_keep_fraction": 0.9}):
        with pytest.raises(ckpt_lib.CheckpointError, match="belongs to another run"):
            resume(tmp_path, state, {**old, **ISSUE18_OFF, **on})
