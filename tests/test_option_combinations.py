"""Every option the configs allow works end to end, in combination (issue 9, part 4).

The trainer runs over a pairwise covering set of option values: every value of every option
appears together with every value of every other option in at least one run (ResNet-only
options: with every value of the options that change what its BatchNorm sees or does). The set
is built here by a small deterministic greedy search, and checked for coverage by a test.

Each run trains a tiny model (FC, Conv2 or a one-block CIFAR ResNet-18) for 3 steps on the
embedded MNIST-5k, on one device, and must: finish with finite losses; keep exactly
kept_count(n, k) weights per edge-popup layer (or layer group, for the global scope) and give
each layer the mode its options ask for; evaluate every one of the 1,000 test images with a
top-1 in [0, 1]; and export a subnet that evaluate() scores exactly as the trainer did, or, where
export does not apply (a supermask evaluated by expectation or by a sampled mask), refuse with
a ValueError naming the option, the checkpoint still reproducing the trainer's numbers.

Start-up checks: options the trainer cannot run are refused with a ValueError naming the field
(and the allowed values), before anything is written.

Compilation dominates the cost; the runs compile with XLA's optimizations off
(jax_disable_most_optimizations), which halves it and changes no behaviour tested here.
"""
from __future__ import annotations

import itertools
import pathlib
import random
import sys
from collections import Counter

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import inits, layers, masking, selection  # noqa: E402
from edgepopup_jax.models import resnet  # noqa: E402
from edgepopup_jax.configs import base, default  # noqa: E402
from edgepopup_jax.training import input_pipeline, optim, train  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.subnet import evaluate, export  # noqa: E402

STEPS = 3
RESNET = "cifar_resnet18"

# Each option and the values the runs cover (the library's own lists, so a new value is covered).
FACTORS = {
    "model.name": ("fc", "conv2", RESNET),
    "model.mask": layers.MASK_MODES,
    "model.weight_init": inits.WEIGHT_INITS,
    "model.keep_fraction": (0.3, 1.0),
    "model.mask_scope": selection.MASK_SCOPES,
    "model.supermask_eval": masking.SUPERMASK_EVAL_MODES,
    "data.augment": input_pipeline.AUGMENTS,
    "optim.name": optim.OPTIMIZERS,
    "model.weight_init_mode": inits.FAN_MODES,
    "model.scale_by_keep_fraction": (False, True),
    "model.binary_weights": (False, True),
    "model.score_init": inits.SCORE_INITS,
    "model.score_init_scale": (1.0, 0.5),
    "model.first_last_keep_fraction": (None, 0.7),
    "model.linear_keep_fraction": (None, 0.2),
    "model.dense_first": (False, True),
    "model.dense_last": (False, True),
    "model.compute_dtype": ("float32", "bfloat16"),
    "optim.nesterov": (False, True),
    "optim.momentum": (0.9, 0.0),
    "optim.weight_decay": (1e-4, 0.0),
    "optim.schedule": optim.SCHEDULES,
    "optim.schedule_unit": optim.SCHEDULE_UNITS,
    "optim.warmup_epochs": (0.0, 1.0),
    "optim.warmup_style": optim.WARMUP_STYLES,
    "optim.label_smoothing": (0.0, 0.1),
    "data.cache": (True, False),
    "eval_every_steps": (0, 2),  # 0: once per epoch (here: only at the end); 2: also mid-run
    "checkpoint_every_steps": (0, 1),
}
# Options only a ResNet has (a Conv/FC model refuses them), and the options they are paired with.
RESNET_ONLY = {"model.bn_running_var": resnet.BN_RUNNING_VARS, "model.bn_affine": (None, False, True)}
RESNET_PARTNERS = ("model.mask", "model.compute_dtype", "model.mask_scope", "model.dense_first",
                   "model.dense_last", "data.augment", "optim.name", "optim.weight_decay")
# Pairs of values the start-up checks refuse (each a message naming both fields, tested below):
# no run has them, and no run needs them.
REFUSED_PAIRS = {(("model.mask", "dense"), ("model.binary_weights", True)),
                 (("model.mask", "supermask"), ("model.binary_weights", True)),
                 (("model.mask_scope", "global"), ("model.first_last_keep_fraction", 0.7)),
                 (("model.mask_scope", "global"), ("model.linear_keep_fraction", 0.2))}
# Config fields that are not varied here, and why.
FIXED = {
    "seed": "a number the compiled init takes as an argument",
    "model.width": "sizes the tiny models (the paper's widths compile too slowly for this test)",
    "data.name": "the embedded MNIST-5k (no download)", "data.data_dir": "unused by mnist5k",
    "data.train_split": "mnist5k's", "data.eval_split": "mnist5k's",
    "data.image_size": "set by data.augment='imagenet' (16 here)",
    "data.mean": "mnist5k's", "data.std": "mnist5k's", "data.shuffle_buffer": "any >= 1",
    "optim.learning_rate": "a number", "optim.b1": "Adam's", "optim.b2": "Adam's",
    "optim.eps": "Adam's", "batch_size": "32", "eval_batch_size": "600: the last batch is padded",
    "num_epochs": "num_train_steps sets the length", "num_train_steps": f"{STEPS}",
    "log_every_steps": "1: every step's loss is checked", "keep_checkpoints": "any >= 1",
    "state_sharding": "one device here: fsdp vs replicated on 4 devices is in test_sharding.py",
    "data.pipeline": "tf_data here: a device-path run equals itself in a group in test_parallel.py",
    "data.device_memory_fraction": "read only by pipeline='auto' (test_device_data.py)",
    "data.bad_images": "mnist5k has no bad images: test_bad_images.py plants them in folders",
    "data.max_bad_fraction": "read only with bad images (test_bad_images.py)",
    "parallel_runs": "1: one run here; groups of runs are test_parallel.py's",
    "parallel_split": "read only by groups: runs and data split over 8 devices in test_parallel.py",
    "checkpoint.on_corrupt": "read only when a checkpoint is corrupt (test_faults.py)",
    "finetune_epochs": "device path only: test_finetune.py",
    # The sparsity schedule and IteRand train on the device data path, refused on tf_data
    # (tested there); their pairs with the other options are test_followups.py's.
    "model.keep_fraction_start": "device path only", "model.keep_fraction_anneal_epochs": "device path only",
    "model.keep_fraction_anneal": "device path only", "model.rerand_every": "device path only",
    "model.rerand_rate": "device path only", "model.rerand_mode": "device path only",
    "model.rerand_lambda": "device path only", "model.rerand_mu": "device path only",
}
TINY = {"fc": {"width": 0.02}, "conv2": {"width": 0.05},
        RESNET: {"width": 0.0625, "stage_sizes": (1,)}}
FIRST_LAYER = {"fc": "fc0", "conv2": "conv0", RESNET: "stem_conv"}


def _domain(name):
    return FACTORS.get(name) or RESNET_ONLY[name]


def _names():
    return list(FACTORS) + list(RESNET_ONLY)


def required_pairs() -> set:
    """((option, value), (option, value)) pairs that some run must have together."""
    pairs = set()
    for a, b in itertools.combinations(_names(), 2):
        if b in RESNET_ONLY and a not in RESNET_PARTNERS + ("model.name",):
            continue
        for va, vb in itertools.product(_domain(a), _domain(b)):
            if b in RESNET_ONLY and a == "model.name" and va != RESNET:
                continue
            if _pair((a, va), (b, vb)) not in REFUSED_PAIRS:
                pairs.add(((a, va), (b, vb)))
    return pairs


_ORDER = {name: i for i, name in enumerate(_names())}


def _pair(p, q):
    """The pair of two (option, value) items, in the order of _names()."""
    return (p, q) if _ORDER[p[0]] < _ORDER[q[0]] else (q, p)


def pairs_of(row: dict) -> set:
    return {_pair(p, q) for p, q in itertools.combinations(row.items(), 2)}


def valid(row: dict) -> bool:
    """Whether the start-up checks allow the row: ResNet-only options exactly on ResNet rows,
    and no refused pair."""
    return (all((name in row) == (row["model.name"] == RESNET) for name in RESNET_ONLY)
            and not pairs_of(row) & REFUSED_PAIRS)


def _allowed(row: dict, name: str, value) -> bool:
    return all(_pair((n, w), (name, value)) not in REFUSED_PAIRS for n, w in row.items())


def _greedy_rows(seed: int, candidates: int) -> list[dict]:
    """Rows until every required pair is covered: each new row starts from an uncovered pair,
    fills the other options one by one (in an order shuffled by a seeded RNG: deterministic)
    with the value that covers the most uncovered pairs, and is the best of `candidates`."""
    rng = random.Random(seed)
    todo = required_pairs()
    rows = []
    while todo:
        ordered = sorted(todo, key=repr)
        best, best_gain = None, -1
        for _ in range(candidates):
            (a, va), (b, vb) = ordered[rng.randrange(len(ordered))]
            row = {a: va, b: vb}
            others = [n for n in FACTORS if n not in row]
            rng.shuffle(others)
            if "model.name" in others:  # first: it decides whether the ResNet options apply
                others.remove("model.name")
                if any(n in row for n in RESNET_ONLY):
                    row["model.name"] = RESNET
                else:
                    others.insert(0, "model.name")
            gain = len(pairs_of(row) & todo)
            for name in others + [n for n in RESNET_ONLY if n not in row]:
                if name in RESNET_ONLY and row["model.name"] != RESNET:
                    continue

                def new_pairs(v, name=name, row=row):
                    return sum(_pair((n, w), (name, v)) in todo for n, w in row.items())
                value = max([v for v in _domain(name) if _allowed(row, name, v)], key=new_pairs)
                gain += new_pairs(value)
                row[name] = value
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        todo -= pairs_of(best)
    return rows


def _move_pair(pair, rows: list[dict], count: Counter, required: set) -> bool:
    """Puts `pair` into one of `rows` by changing only values that no required pair needs there
    (every required pair through them is covered by another row too); updates `count`."""
    for row in rows:
        def free(name, row=row):
            return all(count[p] > 1 for p in pairs_of(row) & required
                       if name in (p[0][0], p[1][0]))
        if all(row.get(n) == v or (n in row and free(n)) for n, v in pair):
            new = {**row, **dict(pair)}
            if valid(new):
                count.subtract(pairs_of(row) & required)
                row.update(new)
                count.update(pairs_of(row) & required)
                return True
    return False


def covering_rows(seed: int, candidates: int = 16) -> list[dict]:
    """The greedy rows, then, from the last row back, each row dropped whose required pairs
    the other rows can take over (_move_pair)."""
    rows, required = _greedy_rows(seed, candidates), required_pairs()
    i = len(rows) - 1
    while i >= 0:
        rest = [dict(r) for k, r in enumerate(rows) if k != i]
        count = Counter(p for r in rest for p in pairs_of(r) & required)
        lost = sorted((pairs_of(rows[i]) & required) - set(count), key=repr)
        if all(_move_pair(p, rest, count, required) for p in lost):
            rows, i = rest, len(rest) - 1
        else:
            i -= 1
    return rows


SEED = 28  # one of the seeds 0-59 giving the fewest rows: 19 (17 before issue 18's options)
ROWS = covering_rows(SEED)


def row_config(row: dict):
    c = default.get_config()
    c.num_train_steps, c.log_every_steps, c.batch_size, c.eval_batch_size = STEPS, 1, 32, 600
    for key, value in list(TINY[row["model.name"]].items()):
        c.model[key] = value
    for key, value in row.items():
        node, leaf = (c, key) if "." not in key else (c[key.split(".")[0]], key.split(".")[1])
        node[leaf] = value
    if row["data.augment"] == "imagenet":
        c.data.image_size = 16
    return c


def row_id(row: dict) -> str:
    short = {"model.name": "", "model.mask": "", "model.weight_init": "", "model.mask_scope": "",
             "model.compute_dtype": "", "data.augment": "aug=", "optim.name": ""}
    return "-".join(f"{p}{row[n]}" for n, p in short.items())


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def test_the_runs_cover_every_pair_of_option_values_and_every_config_field():
    covered = set().union(*(pairs_of(r) for r in ROWS))
    missing = required_pairs() - covered
    assert not missing, sorted(missing, key=repr)[:10]
    assert all(valid(r) for r in ROWS)
    assert all(set(r) == set(FACTORS) | (set(RESNET_ONLY) if r["model.name"] == RESNET else set())
               for r in ROWS)
    # Every field a config has is varied here or fixed for a stated reason, so a new option
    # cannot be added without being covered.
    fields = {f"{k}.{leaf}" if isinstance(v, dict) else k
              for k, v in base.get_base().to_dict().items()
              for leaf in (v if isinstance(v, dict) else [None])}
    fields |= {"model.width", "model.bn_running_var", "model.bn_affine"}  # conv-net / ResNet fields
    assert fields - set(FACTORS) - set(RESNET_ONLY) - set(FIXED) == set()
    assert len(ROWS) <= 19, len(ROWS)  # each run costs seconds


def _expected_mode(row: dict, layer: str) -> str:
    if row["model.mask"] == "dense":
        return "dense"
    if (layer == FIRST_LAYER[row["model.name"]] and row["model.dense_first"]) or \
            (layer == "head" and row["model.dense_last"]):
        return "dense"
    return row["model.mask"]


def _expected_keep_fraction(row: dict, layer: str) -> float:
    """The layer's own keep fraction: first_last for the first and last layers, linear for the
    dense ones (fc*, head), else keep_fraction (each when set)."""
    first_last, linear = row["model.first_last_keep_fraction"], row["model.linear_keep_fraction"]
    if layer in (FIRST_LAYER[row["model.name"]], "head") and first_last is not None:
        return first_last
    if (layer.startswith("fc") or layer == "head") and linear is not None:
        return linear
    return row["model.keep_fraction"]


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_option_combination_trains_evaluates_and_exports(row, tmp_path):
    """Trains, evaluates, checkpoints and exports (or refuses to export) as the options ask."""
    c = row_config(row)
    workdir = tmp_path / "run"
    one = jax.devices()[:1]
    results = loop.train_and_evaluate(c, str(workdir), devices=one)

    assert results["step"] == STEPS and not results["preempted"]
    losses = [h["loss"] for h in results["train_history"]]
    assert [h["step"] for h in results["train_history"]] == list(range(1, STEPS + 1))
    assert np.all(np.isfinite(losses)), losses
    ev = results["eval"]
    assert ev["count"] == 1000 and 0.0 <= ev["top1"] <= ev["top5"] <= 1.0 and np.isfinite(ev["loss"])
    assert [e["step"] for e in results["eval_history"]] == ([2, 3] if row["eval_every_steps"] else [3])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ([1, 2, 3] if row["checkpoint_every_steps"] else [3])

    # Each layer has the mode its options ask for, and edge-popup keeps exactly k of its weights.
    modes = {l["name"]: l["mode"] for l in results["layers"]}
    assert FIRST_LAYER[row["model.name"]] in modes and "head" in modes
    assert modes == {name: _expected_mode(row, name) for name in modes}
    popped = [l for l in results["layers"] if l["mode"] == "edge_popup"]
    groups = [popped] if row["model.mask_scope"] == "global" and popped else [[l] for l in popped]
    for group in groups:
        k = _expected_keep_fraction(row, group[0]["name"])
        assert sum(l["kept"] for l in group) == masking.kept_count(sum(l["total"] for l in group), k)
    for l in results["layers"]:
        assert 0 <= l["kept"] <= l["total"] and (l["mode"] != "dense" or l["kept"] == l["total"])

    subnet = tmp_path / "run.subnet"
    if row["model.mask"] == "supermask" and row["model.supermask_eval"] != "threshold":
        with pytest.raises(ValueError, match="supermask_eval='threshold'"):
            export.export(str(workdir), str(subnet))
        assert not subnet.exists()
        metrics, _ = evaluate.evaluate(c, workdir=str(workdir), devices=one)
    else:
        stats = export.export(str(workdir), str(subnet))
        assert stats["kept_per_layer"] == {l["name"]: l["kept"] for l in results["layers"]
                                           if l["mode"] != "dense"}
        metrics, rows = evaluate.evaluate(c, subnet_path=str(subnet), devices=one)
        assert {r.name: r.kept for r in rows} == {l["name"]: l["kept"] for l in results["layers"]}
    # float32: exactly the trainer's top-1, top-5, loss and count. bfloat16: the trainer's
    # evaluation is vmapped over its runs, where XLA may round bfloat16 convolutions another way,
    # so an example at a tie may flip (seen: 1 in 1000 of top-5, the loss at 1.1e-4)
    if c.model.compute_dtype == "float32":
        assert metrics == ev
    else:
        assert metrics["count"] == ev["count"]
        for k in ("top1", "top5"):
            assert abs(metrics[k] - ev[k]) <= 0.003, (k, metrics, ev)
        np.testing.assert_allclose(metrics["loss"], ev["loss"], rtol=1e-3)


def _resnet(**options):
    return {"model.name": RESNET, **{f"model.{k}": v for k, v in {**TINY[RESNET], **options}.items()}}


@pytest.mark.parametrize("overrides, message", [
    ({"model.mask": "topk"}, "allowed: edge_popup, supermask, dense"),
    ({"model.mask_scope": "network"}, "allowed: layer, global"),
    ({"model.supermask_eval": "mean"}, "allowed: threshold, expectation, sample"),
    ({"model.weight_init": "he_normal"}, "allowed: kaiming_normal"),
    ({"model.weight_init_mode": "fan_avg"}, "allowed: fan_in, fan_out"),
    ({"model.keep_fraction": 0.0}, "(0, 1]"),
    ({"model.compute_dtype": "int32"}, "compute_dtype must be a floating dtype"),
    ({"model.compute_dtype": "float33"}, "compute_dtype must be a floating dtype"),
    ({"model.bn_running_var": "unbiased"}, "bn_running_var"),  # FC has no BatchNorm
    ({"model.bn_affine": True}, "bn_affine"),  # FC has no BatchNorm
    (_resnet(bn_affine="yes"), "bn_affine must be None"),
    ({"model.binary_weights": True, "model.mask": "supermask"},
     "binary_weights=True needs mask='edge_popup' (biprop's top-k mask), got mask='supermask'"),
    ({"model.binary_weights": True, "model.mask": "dense"}, "got mask='dense'"),
    ({"model.first_last_keep_fraction": 0.5, "model.mask_scope": "global"},
     "first_last_keep_fraction needs mask_scope='layer'"),
    ({"model.linear_keep_fraction": 0.5, "model.mask_scope": "global"},
     "linear_keep_fraction needs mask_scope='layer'"),
    ({"model.linear_keep_fraction": 2.0}, "linear_keep_fraction: keep_fraction must be in (0, 1]"),
    ({"model.score_init": "normal"}, "allowed: kaiming_uniform, uniform, iterand"),
    ({"model.score_init_scale": -1.0}, "score_init_scale must be a number > 0"),
    (_resnet(bn_running_var="torch"), "allowed: unbiased, biased"),
    ({"optim.name": "lamb"}, "allowed: sgd, adam"),
    ({"optim.schedule": "linear"}, "allowed: cosine, constant"),
    ({"optim.schedule_unit": "batch"}, "allowed: epoch, step"),
    ({"optim.warmup_style": "linear"}, "allowed: reference, from_zero"),
    ({"optim.warmup_epochs": 0.5, "optim.schedule_unit": "epoch"}, "whole number"),
    ({"optim.warmup_epochs": -1.0}, "warmup_epochs"),
    ({"data.augment": "autoaugment"}, "allowed: ['none', 'cifar', 'imagenet']"),
    ({"data.shuffle_buffer": 0}, "data.shuffle_buffer must be a whole number >= 1"),
    ({"data.mean": (0.5, 0.5, 0.5), "data.std": (0.2, 0.2, 0.2)}, "data.mean has 3 values"),
    ({"data.std": (0.0,)}, "data.std must be > 0"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"batch_size": 5000}, "larger than the training split"),
    ({"log_every_steps": 0}, "log_every_steps must be a whole number >= 1"),
    ({"eval_every_steps": -1}, "eval_every_steps must be a whole number >= 0"),
    ({"checkpoint_every_steps": -2}, "checkpoint_every_steps must be a whole number >= 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be a whole number >= 1"),
    ({"eval_batch_size": -1}, "eval_batch_size must be positive"),
    ({"num_train_steps": -1, "num_epochs": 0.0}, "no training step"),
])
def test_refused_combination_is_a_clear_error_before_anything_is_written(tmp_path, overrides,
                                                                         message):
    c = row_config({"model.name": "fc", "data.augment": "none"})
    for key, value in overrides.items():
        node, leaf = (c, key) if "." not in key else (c[key.split(".")[0]], key.split(".")[1])
        node[leaf] = value
    with pytest.raises(ValueError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()
