"""The follow-up methods of the device path in combination: every sparsity schedule with every
IteRand mode and both mask scopes (the full product, 18 runs in 3 groups), and with fine-tuning
and binary weights (4 more groups), each finishing with exact kept counts and exporting a subnet
that scores as the trainer did; every layer option resuming bit-exactly; nonsense combinations
refused at start naming both fields."""
import itertools
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import masking  # noqa: E402
from edgepopup_jax.subnet import evaluate, export  # noqa: E402
from edgepopup_jax.training import parallel  # noqa: E402
from edgepopup_jax.training import loop
from tests.test_parallel import config, one_device  # noqa: E402

ANNEALS = {"off": {}, "linear": {"model.keep_fraction_anneal_epochs": 6 / 62},
           "cosine": {"model.keep_fraction_anneal_epochs": 6 / 62, "model.keep_fraction_anneal": "cosine"}}
RERANDS = {"off": {}, "bernoulli": {"model.rerand_every": 4, "model.rerand_rate": 0.2},
           "manual": {"model.rerand_every": 4, "model.rerand_mode": "manual",
                      "model.rerand_lambda": 0.5, "model.rerand_mu": 0.5}}


EXTRAS = {"none": {}, "finetune": {"finetune_epochs": 4 / 62}, "binary": {"model.binary_weights": True}}


@pytest.mark.parametrize("rerand, extra", [(r, "none") for r in RERANDS] + [
    ("bernoulli", "finetune"), ("off", "finetune"), ("manual", "binary"), ("off", "binary")])
def test_schedules_scopes_and_iterand_train_evaluate_and_export_together(tmp_path, rerand, extra):
    rows = list(itertools.product(("layer", "global"), ANNEALS))
    configs = [config(**{"model.keep_fraction": 0.3, "model.mask_scope": scope, **ANNEALS[anneal],
                         **RERANDS[rerand], **EXTRAS[extra], "seed": i})
               for i, (scope, anneal) in enumerate(rows)]
    dirs = [str(tmp_path / f"{scope}-{anneal}") for scope, anneal in rows]
    results = loop.train_group(configs, dirs, devices=one_device())
    for (scope, anneal), c, workdir, r in zip(rows, configs, dirs, results):
        assert np.all(np.isfinite([h["loss"] for h in r["train_history"]])), (scope, anneal)
        groups = [r["layers"]] if scope == "global" else [[layer] for layer in r["layers"]]
        for group in groups:
            assert sum(x["kept"] for x in group) == masking.kept_count(sum(x["total"] for x in group), 0.3)
        assert r["eval"]["count"] == 1000
        assert (r["iterand"] is not None) == (rerand != "off")
        assert (r["keep_fraction_schedule"] is not None) == (anneal != "off")
        subnet = pathlib.Path(workdir) / "run.subnet"
        export.export(workdir, str(subnet))
        metrics, _ = evaluate.evaluate(c, subnet_path=str(subnet), devices=one_device())
        assert metrics["count"] == 1000 and metrics["top1"] == r["eval"]["top1"], (scope, anneal)
        np.testing.assert_allclose(metrics["loss"], r["eval"]["loss"], rtol=1e-5)


@pytest.mark.parametrize("overrides, fields", [
    ({"model.mask": "supermask", "model.keep_fraction_anneal_epochs": 1.0},
     ("model.keep_fraction_anneal_epochs", "model.mask")),
    ({"model.mask": "dense", "model.rerand_every": 10}, ("model.rerand_every", "model.mask")),
    ({"model.keep_fraction_anneal_epochs": 1.0, "model.keep_fraction_start": 0.2},
     ("model.keep_fraction_start", "model.keep_fraction")),
])
def test_nonsense_combinations_are_refused_naming_both_fields(tmp_path, overrides, fields):
    with pytest.raises(ValueError) as e:
        loop.train_group([config(**{"model.keep_fraction": 0.3, **overrides})],
                             [str(tmp_path / "run")], devices=one_device())
    assert all(f in str(e.value) for f in fields), str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [
    {"model.binary_weights": True},
    {"model.score_init": "uniform", "model.score_init_scale": 0.5},
    {"model.first_last_keep_fraction": 0.5, "model.linear_keep_fraction": 0.4},
    {"model.name": "cifar_resnet18", "model.width": 0.0625, "model.stage_sizes": (1,),
     "model.bn_affine": True, "model.weight_init": "kaiming_normal"},
], ids=["binary", "score_init", "per_layer_k", "bn_affine"])
def test_each_layer_option_resumes_bit_exactly(tmp_path, overrides):
    c = config(**{"model.keep_fraction": 0.3, "num_train_steps": 8, **overrides})
    straight = loop.train_group([c], [str(tmp_path / "a")], devices=one_device())[0]
    loop.train_group([c], [str(tmp_path / "b")], devices=one_device(), stop_after_steps=4)
    resumed = loop.train_group([c], [str(tmp_path / "b")], devices=one_device())[0]
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert [h["loss"] for h in resumed["train_history"]] == [h["loss"] for h in straight["train_history"]]
