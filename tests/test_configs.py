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

from edgepopup_jax import inits, input_pipeline, masking, optim, train  # noqa: E402

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
    """One step on a tiny batch; keeps the model, init, optimizer and data recipe as they are."""
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
    return config


# Configs that come out identical after loading train once: groups of specs, in CASES order.
_GROUPS = {}
for _spec in CASES:
    _GROUPS.setdefault(json.dumps(load_config(_spec).to_dict(), sort_keys=True, default=str), []).append(_spec)
GROUPS = [tuple(g) for g in _GROUPS.values()]

# The real one-step run of train_and_evaluate costs one XLA compile of the train step, the eval
# step, the state init and the mask counts (~5-15 s a small net on an idle 2-core CPU, minutes for
# an ImageNet ResNet). Fast: one run per code path (mnist5k / tfds cifar10 + cifar augment; FC and
# conv nets; edge-popup, dense + SGD, dense + Adam, supermask). Slow (@pytest.mark.slow): the
# bigger nets, ImageNet ResNet-50 (~160 s on a loaded 2-core CPU). ResNet-101 and WRN-50-2 only
# build (test_config_loads_and_builds): one CPU step of those adds minutes and no new code path.
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
        scores = sorted(s for n, s in params.items() if n.endswith("scores"))
        frozen = sorted(leaf.shape for leaf in jax.tree.leaves(state.frozen))
        assert scores and scores == frozen
    batch = next(input_pipeline.train_iterator(config.data, batch_size=config.batch_size,
                                               seed=config.seed))
    assert batch["image"].shape == (config.batch_size, *info.image_shape)
    assert batch["image"].dtype == np.uint8  # normalised on the device, in the step
    assert batch["label"].shape == (config.batch_size,)
    assert ((0 <= batch["label"]) & (batch["label"] < info.num_classes)).all()


@pytest.mark.parametrize("spec", _step_params())
def test_config_trains_one_step(spec, mock_data_dir, tmp_path):
    """train_and_evaluate end to end for one step: finite loss, full eval, exact kept counts."""
    config = cheap(load_config(spec), mock_data_dir)
    t = time.time()
    results = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
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
                lambda m=model: m.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(0)},
                                       np.zeros((1, 32, 32, 3), np.float32), train=False))
            shapes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
                      for path, leaf in jax.tree_util.tree_leaves_with_path(variables["frozen"])}
            assert kernels is None or shapes == kernels  # the init changes values, never shapes
            kernels = shapes
    # width 2.0 doubles every conv and hidden dense layer of Conv4 (64, 64, 128, 128 | 256, 256).
    outs = sorted(s[-1] for s in kernels.values())
    assert outs == sorted([128, 128, 256, 256, 512, 512, 10]), kernels
    assert base.model.width == 1.0 and base.model.keep_fraction == 0.5
