"""The follow-up methods of the device path in combination: every sparsity schedule with every
IteRand mode and both mask scopes (the full product, 18 runs in 3 groups), each finishing with
exact kept counts and exporting a subnet that scores as the trainer did; nonsense combinations
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
from tests.test_parallel import config, one_device  # noqa: E402

ANNEALS = {"off": {}, "linear": {"model.keep_fraction_anneal_epochs": 6 / 62},
           "cosine": {"model.keep_fraction_anneal_epochs": 6 / 62, "model.keep_fraction_anneal": "cosine"}}
RERANDS = {"off": {}, "bernoulli": {"model.rerand_every": 4, "model.rerand_rate": 0.2},
           "manual": {"model.rerand_every": 4, "model.rerand_mode": "manual",
                      "model.rerand_lambda": 0.5, "model.rerand_mu": 0.5}}


@pytest.mark.parametrize("rerand", list(RERANDS))
def test_schedules_scopes_and_iterand_train_evaluate_and_export_together(tmp_path, rerand):
    rows = list(itertools.product(("layer", "global"), ANNEALS))
    configs = [config(**{"model.keep_fraction": 0.3, "model.mask_scope": scope, **ANNEALS[anneal],
                         **RERANDS[rerand], "seed": i})
               for i, (scope, anneal) in enumerate(rows)]
    dirs = [str(tmp_path / f"{scope}-{anneal}") for scope, anneal in rows]
    results = parallel.train_group(configs, dirs, devices=one_device())
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
        parallel.train_group([config(**{"model.keep_fraction": 0.3, **overrides})],
                             [str(tmp_path / "run")], devices=one_device())
    assert all(f in str(e.value) for f in fields), str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
