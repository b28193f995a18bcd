"""Tests for edgepopup_jax.training.input_pipeline (no downloads: mnist5k, generated folders,
tfds mocks)."""

import hashlib
import itertools
import zipfile
from collections import Counter
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from edgepopup_jax.training import input_pipeline as ip

CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_png.zip"


def make_config(**overrides):
    cfg = dict(
        name="mnist5k",
        data_dir=None,
        train_split="train",
        eval_split="test",
        augment="none",
        image_size=224,
        mean=(0.1307,),
        std=(0.3081,),
        shuffle_buffer=4000,
        cache=True,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def hashes(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])


# ----------------------------------------------------------------------------- mnist5k


def test_mnist5k_info():
    info = ip.get_info(make_config())
    assert info == ip.DatasetInfo(num_classes=10, image_shape=(28, 28, 1), num_train=4000, num_eval=1000)
    with pytest.raises(Exception):
        info.num_train = 1  # frozen
    assert ip.steps_per_epoch(info, 128) == 31
    assert ip.num_eval_batches(info, 64, 2) == 8


def test_mnist5k_train_batch_shapes_and_normalisation():
    batch = next(ip.train_iterator(make_config(), batch_size=2000, seed=0))
    assert batch["image"].shape == (2000, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2000,) and batch["label"].dtype == np.int32
    # Normalised on the device: mnist5k's pixel statistics are those of MNIST (0.131 / 0.309).
    image = np.asarray(ip.normalize(batch["image"], (0.1307,), (0.3081,)))
    assert image.dtype == np.float32
    assert abs(image.mean()) < 0.03
    assert abs(image.std() - 1.0) < 0.03
    np.testing.assert_allclose(image.min(), -0.1307 / 0.3081, atol=1e-5)


def test_uint8_batches_normalise_on_device_to_the_images_of_before(tmp_path):
    """Batches cross as uint8 and `normalize` runs in the step: the same float32 images as the
    host-side normalisation gave, exactly for pixel-exact augmentations, and within half a pixel
    level for the resizing ImageNet transforms (which now round to uint8 first)."""
    mean, std = (0.1307,), (0.3081,)
    batch = next(ip.train_iterator(make_config(), batch_size=500, seed=0))
    before = ((tf.cast(batch["image"], tf.float32) / 255.0 - mean) / std).numpy()
    np.testing.assert_allclose(np.asarray(ip.normalize(batch["image"], mean, std)), before,
                               rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(0)
    raw = tf.io.encode_jpeg(rng.integers(0, 256, (75, 100, 3), np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = make_config(augment="imagenet", image_size=32, mean=mean, std=std)
    resized = ip._resize_center_crop(ip._decode_image(raw, 3), 32)
    before = ((resized / 255.0 - mean) / std).numpy()
    after = np.asarray(ip.normalize(ip._eval_transform(cfg, ip._decode_image(raw, 3)).numpy()[None], mean, std))[0]
    assert np.max(np.abs(after - before)) <= 0.5 / 255 / min(std) + 1e-6


def test_mnist5k_splits_balanced_and_disjoint():
    train = take(ip.train_iterator(make_config(), batch_size=500, seed=1), 8)  # exactly one epoch
    train_labels = np.concatenate([b["label"] for b in train])
    assert np.bincount(train_labels).tolist() == [400] * 10
    evals = list(ip.eval_iterator(make_config(), batch_size=250, process_index=0, process_count=1))
    eval_labels = np.concatenate([b["label"] for b in evals])
    assert np.bincount(eval_labels).tolist() == [100] * 10
    train_h = set(hashes(np.concatenate([b["image"] for b in train])))
    eval_h = set(hashes(np.concatenate([b["image"] for b in evals])))
    assert len(train_h) == 4000 and len(eval_h) == 1000
    assert not train_h & eval_h


# ----------------------------------------------------------------------------- determinism


def test_train_same_seed_same_batches_different_seed_differs():
    cfg = make_config(augment="cifar")
    a = take(ip.train_iterator(cfg, batch_size=64, seed=3), 3)
    b = take(ip.train_iterator(cfg, batch_size=64, seed=3), 3)
    c = take(ip.train_iterator(cfg, batch_size=64, seed=4), 3)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_epochs_are_reshuffled_permutations():
    epochs = take(ip.train_iterator(make_config(), batch_size=1000, seed=0), 8)  # 4 steps per epoch
    first, second = epochs[:4], epochs[4:]
    assert not np.array_equal(first[0]["label"], second[0]["label"])
    assert sorted(hashes(np.concatenate([b["image"] for b in first]))) == sorted(
        hashes(np.concatenate([b["image"] for b in second]))
    )


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_resume_from_start_step_across_epochs(augment):
    cfg = make_config(augment=augment, shuffle_buffer=1000)
    full = take(ip.train_iterator(cfg, batch_size=1000, seed=7), 10)  # 4 steps per epoch
    for start in (1, 3, 4, 6):
        resumed = take(ip.train_iterator(cfg, batch_size=1000, seed=7, start_step=start), 10 - start)
        assert_same_batches(resumed, full[start:])


def test_augmentation_differs_between_epochs():
    # The same example gets a different crop/flip in a later epoch.
    cfg = make_config(augment="cifar")
    batches = take(ip.train_iterator(cfg, batch_size=2000, seed=0), 4)  # 2 epochs
    clean = take(ip.train_iterator(make_config(), batch_size=2000, seed=0), 4)
    # Same seed: same example order with and without augmentation.
    for x, y in zip(batches, clean):
        np.testing.assert_array_equal(x["label"], y["label"])
    changed = [np.mean(np.any(x["image"] != y["image"], axis=(1, 2, 3))) for x, y in zip(batches, clean)]
    assert all(0.5 < c < 1.0 for c in changed), changed  # crops/flips alter most, not all (unshifted, unflipped)


# ----------------------------------------------------------------------------- per-process shards


def test_train_process_shards_disjoint_and_equal():
    cfg = make_config()
    shards = [
        np.concatenate([b["image"] for b in take(ip.train_iterator(cfg, 500, seed=0, process_index=p, process_count=2), 4)])
        for p in range(2)
    ]
    h0, h1 = set(hashes(shards[0])), set(hashes(shards[1]))
    assert len(h0) == len(h1) == 2000
    assert not h0 & h1


def test_eval_process_shards_cover_split_exactly_once():
    cfg = make_config()
    info = ip.get_info(cfg)
    single = list(ip.eval_iterator(cfg, batch_size=64, process_index=0, process_count=1))
    assert len(single) == ip.num_eval_batches(info, 64, 1) == 16
    per_process = [list(ip.eval_iterator(cfg, batch_size=64, process_index=p, process_count=2)) for p in range(2)]
    assert [len(x) for x in per_process] == [ip.num_eval_batches(info, 64, 2)] * 2 == [8, 8]

    def real_hashes(batches):
        images = np.concatenate([b["image"][b["valid"] == 1] for b in batches])
        labels = np.concatenate([b["label"][b["valid"] == 1] for b in batches])
        return Counter(h + str(l) for h, l in zip(hashes(images), labels))

    expected = real_hashes(single)
    assert sum(expected.values()) == 1000
    assert real_hashes(per_process[0]) + real_hashes(per_process[1]) == expected
    for batches in [single, *per_process]:
        for b in batches:
            assert b["image"].shape == (64, 28, 28, 1) and b["valid"].dtype == np.float32
            pad = b["valid"] == 0
            assert np.all(b["image"][pad] == 0) and np.all(b["label"][pad] == 0)
    assert single[-1]["valid"].sum() == 1000 - 15 * 64
    assert per_process[1][-1]["valid"].sum() == 500 - 7 * 64


def test_eval_more_processes_than_batches_pads_whole_batches():
    cfg = make_config()
    runs = [list(ip.eval_iterator(cfg, batch_size=300, process_index=p, process_count=3)) for p in range(3)]
    assert [len(r) for r in runs] == [2, 2, 2]
    assert sum(b["valid"].sum() for r in runs for b in r) == 1000


def test_eval_is_deterministic():
    a = list(ip.eval_iterator(make_config(), batch_size=128, process_index=0, process_count=1))
    b = list(ip.eval_iterator(make_config(), batch_size=128, process_index=0, process_count=1))
    assert_same_batches(a, b)


# ----------------------------------------------------------------------------- folder


CLASSES = ("cat", "ant", "bee")  # ImageFolder numbers sorted names: ant=0, bee=1, cat=2


def write_folder(root, per_class={"train": 6, "test": 3}, height=12, width=10):
    """Every image is constant with value 10 * index + 1 (unique), so contents identify examples."""
    index = 0
    for split, n in per_class.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                image = tf.fill((height, width, 3), tf.constant(index + 1, tf.uint8))
                tf.io.write_file(str(root / split / name / f"{k}.png"), tf.io.encode_png(image))
                index += 1
    return root


def folder_config(root, **overrides):
    return make_config(**{"name": "folder", "data_dir": str(root), "mean": (0.0,) * 3, "std": (1 / 255,) * 3, **overrides})


def pixel_ids(batch):
    return batch["image"][..., 0, 0, 0].round().astype(int)


@pytest.mark.parametrize("cache", [True, False])
def test_folder_info_labels_train_and_eval(tmp_path, cache):
    root = write_folder(tmp_path / "data")
    cfg = folder_config(root, cache=cache)
    info = ip.get_info(cfg)
    assert info == ip.DatasetInfo(num_classes=3, image_shape=(12, 10, 3), num_train=18, num_eval=9)
    # image value v is in train iff v <= 18; class of value v is CLASSES[(v - 1) // n % 3]
    expected_label = lambda v, n, offset: sorted(CLASSES).index(CLASSES[(v - 1 - offset) // n])  # noqa: E731

    epoch = take(ip.train_iterator(cfg, batch_size=6, seed=0), 3)
    ids = np.concatenate([pixel_ids(b) for b in epoch])
    assert sorted(ids.tolist()) == list(range(1, 19))
    labels = np.concatenate([b["label"] for b in epoch])
    assert labels.tolist() == [expected_label(v, 6, 0) for v in ids]
    assert epoch[0]["image"].shape == (6, 12, 10, 3)

    evals = list(ip.eval_iterator(cfg, batch_size=4, process_index=0, process_count=1))
    assert len(evals) == 3 and [b["valid"].sum() for b in evals] == [4, 4, 1]
    eval_ids = np.concatenate([pixel_ids(b)[b["valid"] == 1] for b in evals])
    assert sorted(eval_ids.tolist()) == list(range(19, 28))
    eval_labels = np.concatenate([b["label"][b["valid"] == 1] for b in evals])
    assert eval_labels.tolist() == [expected_label(v, 3, 18) for v in eval_ids]


def test_folder_process_shards_and_resume(tmp_path):
    cfg = folder_config(write_folder(tmp_path / "data", per_class={"train": 7, "test": 2}))  # 21 train
    shards = [take(ip.train_iterator(cfg, 5, seed=0, process_index=p, process_count=2), 4) for p in range(2)]
    ids = [set(np.concatenate([pixel_ids(b) for b in s[:2]]).tolist()) for s in shards]  # 10 per shard, 2 steps/epoch
    assert len(ids[0]) == len(ids[1]) == 10 and not ids[0] & ids[1]
    resumed = take(ip.train_iterator(cfg, 5, seed=0, start_step=1, process_index=1, process_count=2), 3)
    assert_same_batches(resumed, shards[1][1:])
    evals = [list(ip.eval_iterator(cfg, 2, process_index=p, process_count=2)) for p in range(2)]
    assert len(evals[0]) == len(evals[1]) == 2
    eval_ids = sorted(v for e in evals for b in e for v in pixel_ids(b)[b["valid"] == 1].tolist())
    assert eval_ids == list(range(22, 28))


def test_folder_imagenet_augment_shapes(tmp_path):
    root = write_folder(tmp_path / "data", per_class={"train": 2, "test": 1}, height=40, width=30)
    cfg = folder_config(root, augment="imagenet", image_size=16)
    assert ip.get_info(cfg).image_shape == (16, 16, 3)
    assert next(ip.train_iterator(cfg, 3))["image"].shape == (3, 16, 16, 3)
    evals = list(ip.eval_iterator(cfg, 4, process_index=0, process_count=1))
    assert evals[0]["image"].shape == (4, 16, 16, 3)
    # Constant images stay constant under resize + crop.
    np.testing.assert_allclose(evals[0]["image"][0], evals[0]["image"][0, 0, 0, 0], rtol=1e-4)


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason=f"{CIFAR_ZIP} not present")
def test_real_cifar10_folder_from_zip(tmp_path):
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
        picked = [n for split in ("train", "test") for n in [x for x in names if x.startswith(split + "/")][:2000:200]]
        for n in picked:
            zf.extract(n, tmp_path)
    cfg = folder_config(tmp_path, augment="cifar", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    info = ip.get_info(cfg)
    assert info.image_shape == (32, 32, 3) and info.num_train == 10 and info.num_eval == 10
    batch = next(ip.train_iterator(cfg, batch_size=10))
    assert batch["image"].shape == (10, 32, 32, 3)
    image = np.asarray(ip.normalize(batch["image"], cfg.mean, cfg.std))
    assert batch["image"].dtype == np.uint8 and -2.5 < image.mean() < 2.5


# ----------------------------------------------------------------------------- tfds catalog (mocked)


def mock_tfds(tmp_path, name, splits, num_examples):
    """Mocked `name` whose (written) metadata declares `num_examples` per split, as the mock yields."""
    builder = tfds.builder(name, data_dir=str(tmp_path))
    builder.info.set_splits(
        tfds.core.SplitDict([tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0) for s in splits])
    )
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    return tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path))


def test_tfds_cifar10_mock_cifar_augment(tmp_path):
    with mock_tfds(tmp_path, "cifar10", ("train", "test"), 64):
        cfg = make_config(
            name="cifar10", data_dir=str(tmp_path), augment="cifar", mean=(0.5,) * 3, std=(0.25,) * 3, shuffle_buffer=64
        )
        info = ip.get_info(cfg)
        assert info == ip.DatasetInfo(num_classes=10, image_shape=(32, 32, 3), num_train=64, num_eval=64)
        aug = next(ip.train_iterator(cfg, batch_size=32, seed=0))
        plain = next(ip.train_iterator(make_config(**{**cfg.to_dict(), "augment": "none"}), batch_size=32, seed=0))
        evals = list(ip.eval_iterator(cfg, batch_size=48, process_index=0, process_count=1))
    assert aug["image"].shape == (32, 32, 32, 3) and aug["label"].dtype == np.int32
    np.testing.assert_array_equal(aug["label"], plain["label"])
    assert np.mean(np.any(aug["image"] != plain["image"], axis=(1, 2, 3))) > 0.5
    assert [b["valid"].sum() for b in evals] == [48, 16]
    assert evals[0]["image"].shape == (48, 32, 32, 3)


def test_tfds_imagenet2012_mock_imagenet_augment(tmp_path):
    with mock_tfds(tmp_path, "imagenet2012", ("train", "validation"), 8):
        cfg = make_config(
            name="imagenet2012",
            data_dir=str(tmp_path),
            eval_split="validation",
            augment="imagenet",
            image_size=64,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            shuffle_buffer=8,
            cache=False,
        )
        info = ip.get_info(cfg)
        assert info == ip.DatasetInfo(num_classes=1000, image_shape=(64, 64, 3), num_train=8, num_eval=8)
        train = next(ip.train_iterator(cfg, batch_size=4, seed=0))
        evals = list(ip.eval_iterator(cfg, batch_size=4, process_index=0, process_count=1))
    assert train["image"].shape == (4, 64, 64, 3) and np.isfinite(train["image"]).all()
    assert len(evals) == 2 and evals[0]["image"].shape == (4, 64, 64, 3)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(name="no_such_dataset"), "no_such_dataset"),
        (dict(name="folder", data_dir=None), "data_dir=None"),
        (dict(name="folder", data_dir="/no/such/dir"), "/no/such/dir"),
        (dict(augment="autoaugment"), "autoaugment.*'none', 'cifar', 'imagenet'"),
        (dict(train_split="validation"), "'validation'.*'test', 'train'"),
        (dict(eval_split="val"), "'val'.*'test', 'train'"),
    ],
)
def test_bad_config_raises(overrides, match):
    cfg = make_config(**overrides)
    with pytest.raises(ValueError, match=match):
        ip.get_info(cfg)
    with pytest.raises(ValueError, match=match):
        next(ip.train_iterator(cfg, batch_size=8) if "eval_split" not in overrides else ip.eval_iterator(cfg, 8))


def test_unknown_name_message_lists_allowed():
    with pytest.raises(ValueError, match="'mnist5k', 'folder', or a tfds catalog name"):
        ip.get_info(make_config(name="no_such_dataset"))


@pytest.mark.parametrize("batch_size", [0, -4])
def test_bad_batch_size_raises(batch_size):
    with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
        next(ip.train_iterator(make_config(), batch_size=batch_size))
    with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
        next(ip.eval_iterator(make_config(), batch_size=batch_size))


def test_batch_larger_than_shard_raises():
    with pytest.raises(ValueError, match="batch_size=3000"):
        next(ip.train_iterator(make_config(), batch_size=3000, process_index=0, process_count=2))


def test_unprepared_tfds_dataset_raises_with_location(tmp_path):
    with pytest.raises(ValueError, match=f"not prepared.*{tmp_path}"):
        ip.get_info(make_config(name="cifar10", data_dir=str(tmp_path)))


def test_jpeg_training_crop_decodes_only_the_window():
    """decode_and_crop_jpeg gives the same window as decoding the whole JPEG and cropping it, and
    the same pixels except the window's outermost row/column (chroma upsampling at its edge)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (int(v) for v in rng.integers(40, 300, 2))
        pixels = tf.image.resize(rng.integers(0, 256, (h, w, 3), np.uint8), (h, w)).numpy().astype(np.uint8)
        raw = tf.io.encode_jpeg(pixels, quality=85)
        seed = tf.constant([7, i], tf.int64)
        full = ip._decode_image(raw, 3)
        begin, size = ip._crop_window(tf.shape(full), seed)
        whole_then_crop = tf.slice(full, begin, size).numpy()
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        only_window = tf.image.decode_and_crop_jpeg(raw, window, channels=3).numpy()
        assert only_window.shape == whole_then_crop.shape
        np.testing.assert_array_equal(only_window[1:-1, 1:-1], whole_then_crop[1:-1, 1:-1])
        fused = ip._decode_random_resized_crop(raw, seed, 32, 3).numpy()
        plain = ip._random_resized_crop(full, seed, 32).numpy()
        assert fused.shape == plain.shape == (32, 32, 3)
        assert np.mean(np.abs(fused - plain)) < 3.0  # only the resized border can differ
    png = tf.io.encode_png(pixels)  # other formats: decoded whole, identical
    np.testing.assert_array_equal(ip._decode_random_resized_crop(png, seed, 32, 3).numpy(),
                                  ip._random_resized_crop(ip._decode_image(png, 3), seed, 32).numpy())


# ----------------------------------------------------------------------------- tfds files, reshuffled per epoch


class ShardedIds(tfds.core.GeneratorBasedBuilder):
    """A prepared tfds data set in 4 files: example i is a 2x2 image of value i + 1."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(2, 2, 1)),
                                                 "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(64)), "test": self._generate_examples(range(64, 72))}

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": np.full((2, 2, 1), i + 1, np.uint8), "label": i % 3}


def test_tfds_files_are_reshuffled_every_epoch_deterministically_and_resumably(tmp_path):
    ShardedIds(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    # shuffle_buffer=1: no example-level shuffle, so the order seen is the order the files are read
    cfg = make_config(name="sharded_ids", data_dir=str(tmp_path), image_size=2, mean=(0.0,), std=(1 / 255,),
                      shuffle_buffer=1, cache=False)
    run = take(ip.train_iterator(cfg, batch_size=8, seed=0), 24)  # 3 epochs of 8 steps
    epochs = [np.concatenate([pixel_ids(b) for b in run[e * 8:(e + 1) * 8]]) for e in range(3)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(1, 65))  # every example once per epoch
    assert len({tuple(ids) for ids in epochs}) == 3  # a new file order every epoch
    assert_same_batches(take(ip.train_iterator(cfg, batch_size=8, seed=0), 24), run)  # deterministic
    for start in (5, 11):  # resumed mid-epoch, in the first and in a later epoch
        assert_same_batches(take(ip.train_iterator(cfg, batch_size=8, seed=0, start_step=start), 24 - start),
                            run[start:])
    # Cached, the files are read once: with the same buffer-1 shuffle every epoch has one order.
    cached = take(ip.train_iterator(make_config(**{**cfg.to_dict(), "cache": True}), batch_size=8, seed=0), 16)
    assert_same_batches(cached[:8], cached[8:])


HIDE_GPU_ON_FIRST_USE = """
import tensorflow
calls = []
tensorflow.config.set_visible_devices = lambda devices, kind: calls.append((list(devices), kind))
from edgepopup_jax.training import input_pipeline
assert calls == [], calls  # importing the module does not touch TensorFlow
input_pipeline.tf.data  # the first use resolves the lazy import
assert ([], "GPU") in calls, calls
print("hidden")
"""


def test_autotune_constant_is_tf_data_autotune():  # written out so TF is not imported for it
    assert ip._AUTOTUNE == tf.data.AUTOTUNE


def test_tensorflow_is_hidden_from_accelerators_when_first_used():
    """TF is imported lazily (the train step runs without it); whenever it is first used, it must
    still be kept off the GPUs, or it grabs the memory JAX needs."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", HIDE_GPU_ON_FIRST_USE], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hidden" in proc.stdout
