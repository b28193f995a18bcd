"""IteRand: the pruned weights redrawn, the kept ones never; deterministic and resumable."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import selection  # noqa: E402
from edgepopup_jax.subnet import export  # noqa: E402
from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.training import step as step_lib
from edgepopup_jax.training import iterand, parallel, train  # noqa: E402
from tests.test_parallel import config, one_device  # noqa: E402


def small_layer(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    w, fresh = rng.normal(size=(n // 20, 20)).astype(np.float32), rng.normal(size=(n // 20, 20)).astype(np.float32)
    mask = (rng.random((n // 20, 20)) < 0.3).astype(np.float32)
    return w, fresh, mask


def test_bernoulli_redraws_only_pruned_weights_each_with_the_rate():
    w, fresh, mask = small_layer(20000)
    key = jax.random.PRNGKey(7)
    out = iterand.redraw({"l": {"kernel": w}}, {"l": {"scores": mask}}, {"l": {"kernel": fresh}}, key,
                         mode="bernoulli", rate=0.25, lam=1.0, mu=0.0)["l"]["kernel"]
    coin = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.25, w.shape))
    expected = np.where((mask > 0) | ~coin, w, fresh)
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(out)[mask > 0], w[mask > 0])  # kept: never touched
    pruned = mask == 0
    redrawn = np.mean(np.asarray(out)[pruned] != w[pruned])
    n = pruned.sum()
    assert abs(redrawn - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n), redrawn  # binomial, 4 sigma


def test_manual_mixes_every_pruned_weight_with_a_fresh_one():
    w, fresh, mask = small_layer()
    out = iterand.redraw({"l": {"kernel": w}}, {"l": {"scores": mask}}, {"l": {"kernel": fresh}},
                         jax.random.PRNGKey(0), mode="manual", rate=0.1, lam=0.5, mu=0.25)["l"]["kernel"]
    np.testing.assert_allclose(np.asarray(out), mask * w + (1 - mask) * (0.5 * w + 0.25 * fresh),
                               rtol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"rerand_every": -1}, "rerand_every must be a whole number of steps >= 0"),
    ({"rerand_every": 2, "rerand_mode": "reset"}, "rerand_mode 'reset'; allowed: bernoulli, manual"),
    ({"rerand_every": 2, "rerand_rate": 1.5}, "rerand_rate must be a probability in [0, 1]"),
    ({"rerand_every": 2, "rerand_mode": "manual"}, "changes nothing: set model.rerand_lambda"),
    ({"rerand_every": 2, "mask": "dense"}, "it needs model.mask='edge_popup', not 'dense'"),
])
def test_bad_iterand_options_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError) as e:
        iterand.check(ml_collections.ConfigDict({"mask": "edge_popup", **fields}))
    assert message in str(e.value)


def rerand(**overrides):
    # kaiming_normal: a fresh draw differs from the old weight almost surely (signed_constant,
    # the default config's, redraws the same value half the time)
    return config(**{"model.keep_fraction": 0.3, "model.rerand_every": 3, "model.rerand_rate": 0.5,
                     "model.weight_init": "kaiming_normal", **overrides})


def test_a_redraw_in_training_touches_only_the_pruned_weights(tmp_path):
    """One redraw, after the last step (6 of 6): the weights it changed are among those the
    final mask prunes, about rerand_rate of them; the kept ones are bit-identical."""
    c = rerand(**{"num_train_steps": 6, "model.rerand_every": 6})
    result = loop.train_group([c], [str(tmp_path / "run")], devices=one_device())[0]
    _, _, variables, _ = export.training_variables(str(tmp_path / "run"))
    model = train.build_model(c, 10)
    initial = jax.jit(lambda: train.create_state(model, train.make_plan(c, _info(tmp_path, c)).tx,
                                                 (28, 28, 1), c.seed))()
    masks = selection.edge_popup_masks(variables["params"], 0.3)
    assert result["iterand"]["redraws"] == 1
    for layer in ("fc0", "fc1", "head"):
        before, after = np.asarray(initial.frozen[layer]["kernel"]), variables["frozen"][layer]["kernel"]
        kept = np.asarray(masks[layer]["scores"]) > 0
        np.testing.assert_array_equal(after[kept], before[kept])
        changed = np.mean(after[~kept] != before[~kept])
        assert 0.45 < changed < 0.55, (layer, changed)
    assert ckpt_lib.tree_hash(variables["frozen"]) == result["iterand"]["frozen_sha256_final"]
    assert result["iterand"]["frozen_sha256_final"] != result["frozen_sha256"]


def _info(tmp_path, c):
    from edgepopup_jax.training import device_data
    return device_data.get_info(c.data, str(tmp_path))


def test_iterand_resumes_bit_exactly_and_differs_from_plain_edge_popup(tmp_path):
    straight = loop.train_group([rerand()], [str(tmp_path / "a")], devices=one_device())[0]
    plain = loop.train_group([rerand(**{"model.rerand_every": 0})], [str(tmp_path / "p")],
                                 devices=one_device())[0]
    assert straight["state_sha256"] != plain["state_sha256"]
    assert straight["iterand"]["redraws"] == 4
    loop.train_group([rerand()], [str(tmp_path / "b")], devices=one_device(), stop_after_steps=4)
    resumed = loop.train_group([rerand()], [str(tmp_path / "b")], devices=one_device())[0]
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert resumed["iterand"] == straight["iterand"]


def test_a_gradient_reaching_the_weights_is_still_caught(tmp_path, monkeypatch):
    real = step_lib._run_step

    def leaky(*args, **kwargs):
        new, keep, metrics = real(*args, **kwargs)
        return new.replace(frozen=jax.tree.map(lambda w: w * 1.001, new.frozen)), keep, metrics

    monkeypatch.setattr(step_lib, "_run_step", leaky)
    loop._COMPILED.clear()  # (a cached step would keep the real one)
    with pytest.raises(RuntimeError, match="frozen weights changed between IteRand's redraws"):
        loop.train_group([rerand(**{"num_train_steps": 4})], [str(tmp_path / "run")],
                             devices=one_device())
