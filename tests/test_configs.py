"""Every configs/*.py loads as main.py loads it, builds its model and trains one step end to end.

The tfds datasets (cifar10, imagenet2012) are mocked with tfds.testing.mock_data; each run is cut
to one step on a tiny batch and one device. Configs that come out identical after loading (e.g.
cifar10_conv4.py and cifar10.py:conv4) are trained once. Every config builds and yields a batch;
the one-step run is split into fast and @pytest.mark.slow cases (see FAST below).
"""
import json
import pathlib
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import inits, masking  # noqa: E402
from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.training import input_pipeline, optim, train  # noqa: E402

CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                      if "def get_config" in p.read_text())
# The files that take an argument, with the variants worth a run of their own (the default arg
# is always run as the plain file).
EXTRA_ARGS = {
    "cifar10.py": ("fc", "conv2", "conv4", "conv6", "conv8", "cifar_resnet18"),
    "cifar10_dense_adam.py": ("conv2",),  # its own learning rate
    "cifar10_dense_sgd.py": ("fc",),
    "cifar10_supermask.py": ("fc",),
}
CASES = [f for f in CONFIG_FILES] + [f"{f}:{a}" for f, args in EXTRA_ARGS.items() for a in args]

MOCK_EXAMPLES = 16  # per split, for every mocked tfds dataset
MOCK_SPLITS = {"cifar10": ("train", "test"), "imagenet2012": ("train", "validation")}


def load_config(spec: str):
    """configs/<spec> (with an optional ':arg'), parsed by ml_collections' config flag as main.py does."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
    values(["main.py", f"--config={ROOT / 'configs' / spec}"])
    return values.config


@pytest.fixture(scope="module")
def mock_data_dir(tmp_path_factory):
    """A data_dir where cifar10 and imagenet2012 are 'prepared' (metadata written, examples mocked)."""
    root = tmp_path_factory.mktemp("tfds")
    for name, splits in MOCK_SPLITS.items():
        builder = tfds.builder(name, data_dir=str(root))
        builder.info.set_splits(tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[MOCK_EXAMPLES], num_bytes=0) for s in splits]))
        pathlib.Path(builder.data_dir).mkdir(parents=True)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=str(root)):
        yield str(root)


def cheap(config, data_dir):
    """One step on a tiny batch; keeps the model's kind, init, optimizer and data recipe as they are."""
    config.num_train_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    if config.data.name == "mnist5k":
        config.batch_size = 8
        config.eval_batch_size = 500  # the whole 1,000-example test split: 2 batches
    else:
        config.data.data_dir = data_dir
        config.data.shuffle_buffer = MOCK_EXAMPLES
        config.batch_size = 4 if config.data.name == "cifar10" else 2
        config.eval_batch_size = 8
    if config.data.augment == "imagenet":
        config.data.image_size = 64
    if "resnet" in config.model.name:
        # Compiling dominates: the blocks repeat, and 2,1,1,1 keeps every kind (identity,
        # projection, strided projection) at a third of ResNet-50's compile.
        with config.unlocked():
            config.model.stage_sizes = (2, 1, 1, 1)
    return config


# Configs that come out identical after loading train once: groups of specs, in CASES order.
_GROUPS = {}
for _spec in CASES:
    _GROUPS.setdefault(json.dumps(load_config(_spec).to_dict(), sort_keys=True, default=str), []).append(_spec)
GROUPS = [tuple(g) for g in _GROUPS.values()]

# The real one-step run of train_and_evaluate costs one XLA compile of the train step, the eval
# step, the state init and the mask counts (~3-10 s a small net on an idle 2-core CPU with XLA's
# optimizations off, see fast_compile; about a minute for an ImageNet ResNet). Fast: one run per
# code path (mnist5k / tfds cifar10 + cifar augment; FC and conv nets; edge-popup, dense + SGD,
# dense + Adam, supermask). Slow (@pytest.mark.slow): the bigger nets, ImageNet ResNet-50.
# ResNet-101 and WRN-50-2 only build (test_config_loads_and_builds): one CPU step of those adds
# minutes and no new code path.
FAST = {"default.py", "cifar10_fc.py", "cifar10_conv2.py", "cifar10_dense_adam.py:conv2",
        "cifar10_dense_sgd.py:fc", "cifar10_supermask.py:fc"}
BUILD_ONLY_MODELS = {"resnet101", "wide_resnet50_2"}


def _step_params():
    params = []
    for group in GROUPS:
        if load_config(group[0]).model.name in BUILD_ONLY_MODELS:
            continue
        marks = () if FAST & set(group) else (pytest.mark.slow,)
        params.append(pytest.param(group[0], id="=".join(group), marks=marks))
    return params


def test_every_config_file_is_covered():
    assert len(CONFIG_FILES) >= 15, CONFIG_FILES
    assert "base.py" not in CONFIG_FILES and "default.py" in CONFIG_FILES
    covered = {s.split(":")[0] for p in _step_params() for s in p.id.split("=")}
    built_only = {s for g in GROUPS for s in g if load_config(g[0]).model.name in BUILD_ONLY_MODELS}
    assert set(CONFIG_FILES) == covered | built_only, (covered, built_only)
    assert built_only == {"imagenet_resnet101.py", "imagenet_wrn50.py"}


@pytest.mark.parametrize("spec", CASES)
def test_config_loads_and_builds(spec, mock_data_dir):
    """Every config: loads (locked, as main.py), its model + optimizer state build (abstractly) and
    its input pipeline yields a train batch of the model's input shape."""
    config = load_config(spec)
    with pytest.raises(AttributeError):  # locked as main.py locks it: a typo'd override fails
        config.model.no_such_field = 1
    config = cheap(config, mock_data_dir)
    info = input_pipeline.get_info(config.data)
    model = train.build_model(config, info.num_classes)
    steps_per_epoch = input_pipeline.steps_per_epoch(info, config.batch_size)
    schedule = optim.learning_rate_schedule(config.optim, 1, steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedule)
    state = jax.eval_shape(lambda: train.create_state(model, tx, info.image_shape, config.seed))
    params = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    assert params
    if config.model.mask == "dense":
        # the baseline trains its weights: kernels, no scores
        assert any(n.endswith("kernel") for n in params) and not any(n.endswith("scores") for n in params)
    else:  # the optimizer trains scores only; the random weights are frozen, one per score
        scores = {n[:-len("scores")]: s for n, s in params.items() if n.endswith("scores")}
        frozen = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
                  for path, leaf in jax.tree_util.tree_leaves_with_path(state.frozen)}
        assert scores and all(frozen.get(layer + "kernel", frozen.get(layer + "embedding")) == s
                              for layer, s in scores.items())
        # the hand-written models freeze kernels only; a transformed one (vit) also the
        # parameters it leaves unmasked (biases, LayerNorm, class token, position embeddings)
        if config.model.name != "vit":
            assert sorted(scores.values()) == sorted(frozen.values())
    batch = next(input_pipeline.train_iterator(config.data, batch_size=config.batch_size,
                                               seed=config.seed))
    assert batch["image"].shape == (config.batch_size, *info.image_shape)
    assert batch["image"].dtype == np.uint8  # normalised on the device, in the step
    assert batch["label"].shape == (config.batch_size,)
    assert ((0 <= batch["label"]) & (batch["label"] < info.num_classes)).all()


@pytest.fixture
def fast_compile():
    """XLA's optimizations off (jax_disable_most_optimizations) for the one-step runs: compiling
    dominates them, and it roughly halves the compile time. Nothing they check (finite loss,
    counts, kept weights) depends on how well the step is optimised."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.parametrize("spec", _step_params())
def test_config_trains_one_step(spec, mock_data_dir, tmp_path, fast_compile):
    """train_and_evaluate end to end for one step: finite loss, full eval, exact kept counts."""
    config = cheap(load_config(spec), mock_data_dir)
    t = time.time()
    results = loop.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    print(f"{spec}: {config.model.name} {config.model.mask}: one step + eval in {time.time() - t:.1f} s")

    assert results["step"] == 1 and results["total_steps"] == 1 and not results["preempted"]
    [logged] = results["train_history"]
    assert logged["step"] == 1 and np.isfinite(logged["loss"]) and 0 <= logged["accuracy"] <= 1
    expected_count = 1000 if config.data.name == "mnist5k" else MOCK_EXAMPLES
    assert results["eval"]["count"] == expected_count, results["eval"]
    assert np.isfinite(results["eval"]["loss"]) and 0 <= results["eval"]["top1"] <= 1

    mode = config.model.mask
    layers = results["layers"]
    assert layers and results["weights_total"] == sum(r["total"] for r in layers)
    for r in layers:
        assert r["total"] == int(np.prod(r["shape"])) > 0
        if mode == "edge_popup":
            assert r["mode"] == "edge_popup", r
            assert r["kept"] == masking.kept_count(r["total"], config.model.keep_fraction), r
        elif mode == "dense":
            assert r["mode"] == "dense" and r["kept"] == r["total"], r
        else:
            assert r["mode"] == "supermask" and 0 <= r["kept"] <= r["total"], r

    # The step moved what trains and nothing else: against the state the trainer started from
    # (the same seed's init), the saved step-1 state has the frozen weights bit-identical and
    # most trained entries changed, scores or the baseline's kernels (all of them under SGD's
    # weight decay; about half under Adam without it, where a dead unit's weights get no
    # gradient at batch 4), so a step that changes nothing, or only some layers, fails here.
    info = input_pipeline.get_info(config.data)
    model = train.build_model(config, info.num_classes)
    tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 1, 1))
    start = jax.jit(lambda: train.create_state(model, tx, info.image_shape, config.seed))()
    saved, _ = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).restore_raw(1)
    for a, b in zip(jax.tree.leaves(start.frozen), jax.tree.leaves(saved["frozen"]), strict=True):
        np.testing.assert_array_equal(a, b)
    before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(start.params)])
    after = np.concatenate([np.ravel(x) for x in jax.tree.leaves(saved["params"])])
    assert before.shape == after.shape and np.mean(before != after) > 0.4, np.mean(before != after)


def test_paper_sweeps_are_expressible_on_conv4():
    """Conv4 at k = 0.3, width 2, every weight init, scaled and unscaled: the model builds."""
    base = load_config("cifar10_conv4.py")
    kernels = None
    for weight_init in inits.WEIGHT_INITS:
        for scaled in (False, True):
            c = load_config("cifar10_conv4.py")
            c.model.keep_fraction = 0.3
            c.model.width = 2.0
            c.model.weight_init = weight_init
            c.model.scale_by_keep_fraction = scaled
            model = train.build_model(c, 10)
            variables = jax.eval_shape(
                lambda m=model: m.init({"params": jax.random.PRNGKey(0), "supermask": jax.random.PRNGKey(0)},
                                       np.zeros((1, 32, 32, 3), np.float32), train=False))
            shapes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
                      for path, leaf in jax.tree_util.tree_leaves_with_path(variables["frozen"])}
            assert kernels is None or shapes == kernels  # the init changes values, never shapes
            kernels = shapes
    # width 2.0 doubles every conv and hidden dense layer of Conv4 (64, 64, 128, 128 | 256, 256).
    outs = sorted(s[-1] for s in kernels.values())
    assert outs == sorted([128, 128, 256, 256, 512, 512, 10]), kernels
    assert base.model.width == 1.0 and base.model.keep_fraction == 0.5


# ---------------------------------------------------------------- recipes: paper and reference
# Sources: the paper (shared/paper, section 4: "CIFAR-10 ... weight decay 1e-4, momentum 0.9,
# batch size 128, and learning rate 0.1"; dense SGD lr 0.01; Adam batch 60, lr 2e-4 / 3e-4, no
# decay of the lr; ImageNet in the appendix) and the reference's configs (allenai/hidden-networks):
#   EP: configs/smallscale/{fc,conv2,conv4,conv6,conv8}/*_usc_unsigned.yml
#   EP_R18: configs/smallscale/resnet18/resnet18-usc-unsigned.yaml
#   SGD: configs/smallscale_baselines/dense/conv*/conv*_sgd_baseline.yml
#   SGD_R18: configs/smallscale/resnet18/resnet18-dense.yaml (lr 0.1, not the conv nets' 0.01)
#   ADAM2, ADAM: configs/smallscale_baselines/dense/conv*/conv*_adam_baseline.yml: no lr_policy
#     (constant_lr) and torch.optim.Adam without weight_decay (main.py get_optimizer)
#   SM, SM_R18: configs/smallscale_baselines/sample/{conv4/conv4sample_usc_unsigned.yml,
#     resnet18/resnet18_usc_unsigned.yml}: "weight_decay: 0 #0.0001" (the paper's text says 1e-4;
#     the reference's configs use 0), lr 200 / 400, batch 128
#   IMAGENET: configs/largescale/subnetonly/resnet50-usc-unsigned.yaml
# Every reference recipe is stepped once per epoch (utils/schedulers.py, called per epoch).
# mask: (optimizer, lr, momentum, weight decay, batch, epochs, warm-up epochs, label smoothing,
# schedule)
RECIPES = {
    "EP": ("edge_popup", "sgd", 0.1, 0.9, 1e-4, 128, 100, 0, 0.0, "cosine"),
    "EP_R18": ("edge_popup", "sgd", 0.1, 0.9, 5e-4, 256, 100, 0, 0.0, "cosine"),
    "SGD": ("dense", "sgd", 0.01, 0.9, 1e-4, 128, 100, 0, 0.0, "cosine"),
    "SGD_R18": ("dense", "sgd", 0.1, 0.9, 5e-4, 256, 100, 0, 0.0, "cosine"),
    "ADAM2": ("dense", "adam", 2e-4, None, 0.0, 60, 100, 0, 0.0, "constant"),
    "ADAM": ("dense", "adam", 3e-4, None, 0.0, 60, 100, 0, 0.0, "constant"),
    "SM": ("supermask", "sgd", 200.0, 0.9, 0.0, 128, 100, 0, 0.0, "cosine"),
    "SM_R18": ("supermask", "sgd", 400.0, 0.9, 0.0, 128, 100, 0, 0.0, "cosine"),
    "IMAGENET": ("edge_popup", "sgd", 0.256, 0.875, 3.0517578125e-5, 256, 100, 5, 0.1, "cosine"),
}
CIFAR_ARCHS = ("fc", "conv2", "conv4", "conv6", "conv8", "cifar_resnet18")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                  "wide_resnet101_2")
R18 = "cifar_resnet18"
# FC has no CIFAR-10 baseline in the reference (its FC runs are on MNIST): fc's baselines take the
# conv nets' recipes.
RECIPE_OF = {
    **{f"cifar10.py:{a}": "EP_R18" if a == R18 else "EP" for a in CIFAR_ARCHS},
    **{f"cifar10_{f}.py": "EP" for f in ("fc", "conv2", "conv4", "conv6", "conv8")},
    "cifar10_resnet18.py": "EP_R18",
    **{f"cifar10_dense_sgd.py:{a}": "SGD_R18" if a == R18 else "SGD" for a in CIFAR_ARCHS},
    **{f"cifar10_dense_adam.py:{a}": "ADAM2" if a == "conv2" else "ADAM" for a in CIFAR_ARCHS
       if a != R18},
    **{f"cifar10_supermask.py:{a}": "SM_R18" if a == R18 else "SM" for a in CIFAR_ARCHS},
    **{f"imagenet.py:{a}": "IMAGENET" for a in IMAGENET_ARCHS},
    **{f"imagenet_{f}.py": "IMAGENET" for f in ("resnet50", "resnet101", "wrn50")},
    "default.py": None,  # the MNIST-5k demo: no paper recipe (checked below)
    "cifar10_vit.py": "EP",  # not in the paper: its CIFAR-10 recipe on a transformed ViT
}
REFERENCE_CIFAR_NORM = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))  # its data/cifar.py
REFERENCE_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # its data/imagenet.py


def reference_lr(epoch, lr, epochs, warmup, schedule):
    """utils/schedulers.py of the reference: cosine_lr / constant_lr with _warmup_lr."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    if schedule == "constant":
        return lr
    return 0.5 * (1 + np.cos(np.pi * (epoch - warmup) / (epochs - warmup))) * lr


def test_every_config_file_has_a_recipe():
    assert {s.split(":")[0] for s in RECIPE_OF} == set(CONFIG_FILES)


@pytest.mark.parametrize("spec", [s for s, r in RECIPE_OF.items() if r])
def test_config_recipe_matches_the_reference(spec):
    c = load_config(spec)
    recipe = RECIPES[RECIPE_OF[spec]]
    mask, name, lr, momentum, wd, batch, epochs, warmup, smoothing, schedule = recipe
    o = c.optim
    got = (c.model.mask, o.name, o.learning_rate, o.momentum if name == "sgd" else None,
           o.weight_decay, c.batch_size, c.num_epochs, o.warmup_epochs, o.label_smoothing,
           o.schedule)
    assert got == recipe, spec
    assert c.num_train_steps <= 0 and not o.nesterov
    assert (o.schedule_unit, o.warmup_style) == ("epoch", "reference")
    if name == "adam":
        assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)  # torch.optim.Adam's defaults
    # the schedule the trainer builds, at the start and the middle of every epoch (3 steps each)
    steps = np.arange(int(epochs) * 3)
    got_lr = np.asarray(optim.learning_rate_schedule(o, len(steps), 3)(steps))
    want = [reference_lr(e, lr, epochs, warmup, schedule) for e in steps // 3]
    np.testing.assert_allclose(got_lr, want, rtol=2e-6)
    # data and model as the reference runs them
    imagenet = c.data.name == "imagenet2012"
    assert (tuple(c.data.mean), tuple(c.data.std)) == (
        REFERENCE_IMAGENET_NORM if imagenet else REFERENCE_CIFAR_NORM)
    resnet = "resnet" in c.model.name
    assert c.model.get("bn_running_var", "biased") == ("unbiased" if resnet else "biased")
    if mask == "supermask":  # the reference's SampleSubnetConv samples a mask in eval mode too
        assert c.model.supermask_eval == "sample"


def test_default_demo_recipe():
    """default.py is the MNIST-5k demo, not a paper recipe: a smooth per-step cosine."""
    o = load_config("default.py").optim
    assert (o.name, o.learning_rate, o.momentum, o.weight_decay, o.schedule, o.schedule_unit,
            o.warmup_epochs) == ("sgd", 0.1, 0.9, 1e-4, "cosine", "step", 0.0)
    schedule = optim.learning_rate_schedule(o, 100, 10)
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(1)) < float(schedule(0))
