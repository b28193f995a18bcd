"""Checkpoint meta across versions: options added since a checkpoint was written."""
import jax.numpy as jnp
import numpy as np
import pytest

from edgepopup_jax import checkpoint as ckpt_lib

# A ResNet run's model meta as written before mask_scope and bn_running_var existed.
OLD_RESNET = {"name": "cifar_resnet18", "keep_fraction": 0.5, "mask": "edge_popup",
              "weight_init": "kaiming_normal"}


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
