"""Tests for edgepopup_jax.training.device_data: the in-memory, TensorFlow-free data path."""

import functools
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from edgepopup_jax.training import device_data as dd
from edgepopup_jax.training import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# chi-square critical values at p = 1e-4 (scipy.stats.chi2.isf(1e-4, dof)): lenient, fixed thresholds
CHI2_CRITICAL = {8: 31.8276, 64: 114.8337}


def make_config(**overrides):
    cfg = dict(name="mnist5k", data_dir=None, train_split="train", eval_split="test", augment="none")
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def chi_square(observed, expected):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


def test_chi2_critical_values_are_scipys():
    stats = pytest.importorskip("scipy.stats")
    for dof, value in CHI2_CRITICAL.items():
        assert stats.chi2.isf(1e-4, dof) == pytest.approx(value, abs=1e-3)


# ----------------------------------------------------------------------------- epoch order


@pytest.mark.parametrize("n,batch_size", [(60, 10), (64, 10)])
def test_every_example_is_seen_once_per_epoch_per_run(n, batch_size):
    seeds = jnp.array([0, 1, 2], jnp.int32)
    steps = n // batch_size

    @jax.jit
    def epoch_batches(seeds, epoch):
        perms = jax.vmap(lambda s: dd.epoch_permutation(s, epoch, n))(seeds)
        return perms, jnp.stack([jax.vmap(lambda p: dd.batch_indices(p, i, batch_size))(perms)
                                 for i in range(steps)], axis=1)  # [runs, steps, B]

    orders = {}
    for epoch in range(2):
        perms, batches = map(np.asarray, epoch_batches(seeds, jnp.int32(epoch)))
        assert batches.dtype == np.int32 and batches.shape == (3, steps, batch_size)
        for r, seed in enumerate(np.asarray(seeds)):
            seen = batches[r].reshape(-1)
            assert sorted(perms[r]) == list(range(n))
            np.testing.assert_array_equal(seen, perms[r][: steps * batch_size])  # a prefix, no repeats
            assert len(set(seen.tolist())) == steps * batch_size
            if n % batch_size == 0:
                assert sorted(seen.tolist()) == list(range(n))
            # the same (seed, epoch) gives the same order, eagerly, with python ints, alone
            np.testing.assert_array_equal(dd.epoch_permutation(int(seed), epoch, n), perms[r])
            orders[int(seed), epoch] = tuple(perms[r])
    assert len(set(orders.values())) == len(orders)  # different seeds and epochs: different orders


def test_seeds_are_taken_mod_2_32_alike_as_python_ints_and_int32_arrays():
    seeds = [0, 5, -1, -7, 2**31 - 1]
    group = jax.jit(jax.vmap(lambda s: dd.epoch_permutation(s, 1, 20)))(jnp.array(seeds, jnp.int32))
    keys = jax.vmap(lambda s: dd.augment_key(s, 1, 2))(jnp.array(seeds, jnp.int32))
    for seed, perm, key in zip(seeds, group, keys):
        np.testing.assert_array_equal(dd.epoch_permutation(seed, 1, 20), perm)
        np.testing.assert_array_equal(dd.epoch_permutation(np.int64(seed), 1, 20), perm)
        np.testing.assert_array_equal(dd.augment_key(seed, 1, 2), key)
    np.testing.assert_array_equal(dd.epoch_permutation(2**32 - 1, 1, 20), group[2])


def test_augment_key_is_not_the_permutation_key():
    perm_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(dd.DATA_SEED_SALT), 3), 1)
    perm_stream = {tuple(np.asarray(k).tolist()) for k in
                   [perm_key, *jax.random.split(perm_key, 8), *(jax.random.fold_in(perm_key, i) for i in range(5))]}
    keys = {tuple(np.asarray(dd.augment_key(3, 1, i)).tolist()) for i in range(5)}
    assert len(keys) == 5 and not keys & perm_stream
    np.testing.assert_array_equal(dd.augment_key(3, 1, 2), jax.jit(dd.augment_key)(3, 1, 2))


# ----------------------------------------------------------------------------- augmentation


def test_crop_offsets_are_uniform_and_independent_and_flips_fair():
    n = 45_000
    dy, dx, flip = map(np.asarray, dd.crop_and_flip_params(jax.random.PRNGKey(1234), n))
    assert dy.dtype == dx.dtype == np.int32 and flip.dtype == bool
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0  # exactly 0..8
        assert chi_square(counts, np.full(9, n / 9)) < CHI2_CRITICAL[8]
    joint = np.zeros((9, 9))
    np.add.at(joint, (dy, dx), 1)
    expected = np.outer(joint.sum(1), joint.sum(0)) / n
    assert chi_square(joint, expected) < CHI2_CRITICAL[64]
    with_flip = np.zeros((9, 2))
    np.add.at(with_flip, (dy, flip.astype(int)), 1)
    assert chi_square(with_flip, np.outer(with_flip.sum(1), with_flip.sum(0)) / n) < CHI2_CRITICAL[8]
    assert abs(flip.sum() - n / 2) < 4 * np.sqrt(n / 4)


def test_chi_square_detects_a_biased_offset():  # the threshold above can fail
    n = 45_000
    biased = np.bincount(np.random.default_rng(0).integers(0, 8, n), minlength=9)  # never 8
    assert chi_square(biased, np.full(9, n / 9)) > CHI2_CRITICAL[8]


def reference_augment(images, dy, dx, flip):
    _, h, w, _ = images.shape
    p = dd.CROP_PADDING
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.stack([padded[i, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    out[flip] = out[flip][:, :, ::-1]
    return out


def test_cifar_augment_equals_a_numpy_reference():
    images = np.random.default_rng(0).integers(0, 256, (64, 6, 10, 3), dtype=np.uint8)  # H != W
    key = jax.random.PRNGKey(7)
    out = jax.jit(dd.cifar_augment)(images, key)
    assert out.dtype == jnp.uint8 and out.shape == images.shape
    params = map(np.asarray, dd.crop_and_flip_params(key, 64))
    np.testing.assert_array_equal(out, reference_augment(images, *params))


def test_padding_is_zero_exactly_where_the_offsets_say():
    b, h, w, p = 300, 8, 8, dd.CROP_PADDING
    key = jax.random.PRNGKey(3)
    out = np.asarray(dd.cifar_augment(jnp.full((b, h, w, 1), 255, jnp.uint8), key))
    dy, dx, flip = map(np.asarray, dd.crop_and_flip_params(key, b))
    rows = (np.arange(h)[None, :] + dy[:, None] - p)  # source row of each output row
    cols = (np.arange(w)[None, :] + dx[:, None] - p)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    np.testing.assert_array_equal(out[..., 0], np.where(inside, 255, 0))
    assert (out == 0).any() and (out == 255).all(axis=(1, 2, 3)).any()  # some padded, some not


def test_cifar_augment_vmaps_over_runs():
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 8, 8, 3), dtype=np.uint8)
    keys = jax.vmap(lambda s: dd.augment_key(s, 0, 5))(jnp.arange(3))
    together = jax.jit(jax.vmap(dd.cifar_augment))(images, keys)
    for r in range(3):
        np.testing.assert_array_equal(together[r], dd.cifar_augment(images[r], keys[r]))


def test_check_device_augment():
    for augment in dd.DEVICE_AUGMENTS:
        dd.check_device_augment(augment)
    with pytest.raises(ValueError, match=r"none\|cifar.*imagenet.*tf_data"):
        dd.check_device_augment("imagenet")


# ----------------------------------------------------------------------------- train batches


def index_images(n, size=16):
    """Image i is constant i (mod 256) and has label i: the centre pixel survives any crop."""
    labels = np.arange(n, dtype=np.int32)
    return np.broadcast_to((labels % 256).astype(np.uint8)[:, None, None, None], (n, size, size, 1)).copy(), labels


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_train_batch_keeps_labels_with_their_images(augment):
    n, batch_size = 250, 50
    images, labels = index_images(n)
    step = jax.jit(functools.partial(dd.train_batch, batch_size=batch_size, augment=augment))
    perm = dd.epoch_permutation(5, 2, n)
    seen = []
    for i in range(n // batch_size):
        batch = step(images, labels, perm, 5, 2, i)
        assert batch["image"].shape == (batch_size, 16, 16, 1) and batch["image"].dtype == jnp.uint8
        assert batch["label"].dtype == jnp.int32
        np.testing.assert_array_equal(batch["label"], dd.batch_indices(perm, i, batch_size))
        np.testing.assert_array_equal(batch["image"][:, 8, 8, 0], batch["label"])
        if augment == "none":
            np.testing.assert_array_equal(batch["image"], images[np.asarray(batch["label"])])
        seen += np.asarray(batch["label"]).tolist()
    assert sorted(seen) == list(range(n))


def test_train_batch_of_a_vmapped_group_equals_each_run_alone():
    n, batch_size = 96, 16
    images = np.random.default_rng(2).integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    labels = np.random.default_rng(3).integers(0, 10, n).astype(np.int32)
    seeds = jnp.array([0, 1, 7], jnp.int32)
    single = jax.jit(functools.partial(dd.train_batch, batch_size=batch_size, augment="cifar"))

    @jax.jit
    def group(seeds, epoch, index):
        perms = jax.vmap(lambda s: dd.epoch_permutation(s, epoch, n))(seeds)
        return jax.vmap(functools.partial(dd.train_batch, batch_size=batch_size, augment="cifar"),
                        in_axes=(None, None, 0, 0, None, None))(images, labels, perms, seeds, epoch, index)

    steps = n // batch_size
    for step in (0, 3, steps + 2):  # the contract: (seed, step) -> epoch, index_in_epoch
        epoch, index = divmod(step, steps)
        together = group(seeds, jnp.int32(epoch), jnp.int32(index))
        for r, seed in enumerate(np.asarray(seeds).tolist()):
            alone = single(images, labels, dd.epoch_permutation(seed, epoch, n), seed, epoch, index)
            for k in ("image", "label"):
                np.testing.assert_array_equal(together[k][r], alone[k])
        assert not np.array_equal(together["image"][0], together["image"][1])


def test_eval_batches_cover_the_split_in_order_with_padding():
    images, labels = index_images(7, size=4)
    batches = dd.eval_batches(images, labels, 3)
    assert batches["image"].shape == (3, 3, 4, 4, 1) and batches["image"].dtype == np.uint8
    assert batches["label"].dtype == np.int32 and batches["valid"].dtype == np.float32
    np.testing.assert_array_equal(batches["valid"].reshape(-1), [1] * 7 + [0] * 2)
    np.testing.assert_array_equal(batches["label"].reshape(-1)[:7], labels)
    np.testing.assert_array_equal(batches["image"].reshape(9, 4, 4, 1)[:7], images)
    assert not batches["image"].reshape(9, -1)[7:].any() and not batches["label"].reshape(-1)[7:].any()
    assert dd.eval_batches(images, labels, 7)["valid"].shape == (1, 7)


def test_nbytes():
    assert dd.nbytes(ip.DatasetInfo(10, (28, 28, 1), 4000, 1000)) == 5000 * (784 + 4)


# ----------------------------------------------------------------------------- sources


def test_mnist5k_equals_the_tf_data_paths_arrays():
    arrays = ip._mnist5k_arrays()
    for split in ("train", "test"):
        images, labels = dd.load_split(make_config(), split)
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
    assert dd.get_info(make_config()) == ip.DatasetInfo(10, (28, 28, 1), 4000, 1000)
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        dd.load_split(make_config(), "validation")


def write_npz(path, **arrays):
    rng = np.random.default_rng(0)
    data = {"train_images": rng.integers(0, 256, (20, 5, 6), dtype=np.uint8),
            "train_labels": rng.integers(0, 3, 20), "test_images": rng.integers(0, 256, (8, 5, 6), dtype=np.uint8),
            "test_labels": np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int64)}
    data.update(arrays)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return data


def test_npz(tmp_path):
    path = str(tmp_path / "d.npz")
    data = write_npz(path)
    config = make_config(name="npz", data_dir=path)
    images, labels = dd.load_split(config, "train")
    assert images.shape == (20, 5, 6, 1) and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], data["train_images"])
    np.testing.assert_array_equal(labels, data["train_labels"])
    assert dd.get_info(config) == ip.DatasetInfo(4, (5, 6, 1), 20, 8)  # max label + 1 over both splits
    write_npz(path, num_classes=np.array(10))
    assert dd.get_info(config).num_classes == 10
    rgb = np.zeros((8, 5, 6, 3), np.uint8)
    write_npz(path, test_images=rgb, train_images=np.zeros((20, 5, 6, 3), np.uint8))
    assert dd.load_split(config, "test")[0].shape == (8, 5, 6, 3)


@pytest.mark.parametrize("arrays,match", [
    (dict(test_labels=None), r"test_labels.*holds the keys \['test_images', 'train_images', 'train_labels'\]"),
    (dict(test_images=np.zeros((8, 5, 6), np.float32)), r"test_images must be uint8.*float32"),
    (dict(test_labels=np.zeros(7, np.int32)), r"test_labels must be integers \[N\] with N=8"),
    (dict(test_labels=np.zeros((8, 1), np.int32)), r"test_labels must be integers"),
    (dict(test_labels=np.zeros(8, np.float32)), r"test_labels must be integers"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, match):
    path = str(tmp_path / "bad.npz")
    write_npz(path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        dd.load_split(make_config(name="npz", data_dir=path), "test")
    assert path in str(e.value)


def save(path, array, format="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=format)


def make_folder(root):
    """Grey 5x6 images, labels "cat" and "DOG" (sorted, case-sensitively: DOG, cat), both splits;
    train/DOG/c.png is a JPEG and train/cat/b.png an RGB image. Returns {relative path: expected grey pixels [5, 6]}."""
    expected = {}
    for split, count in (("train", 3), ("test", 2)):
        for label_index, label in enumerate(("cat", "DOG")):
            for i in range(count):
                rel = os.path.join(split, label, "abc"[i] + ".png")
                pixels = np.full((5, 6), 10 + 40 * i + 100 * label_index + (split == "test"), np.uint8)
                pixels[0, 0] = 3  # not symmetric: catches transposes
                save(os.path.join(root, rel), pixels)
                expected[rel] = pixels
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[2:, :, 2] = 200, 100, 50
    save(os.path.join(root, "train", "cat", "b.png"), rgb)
    expected[os.path.join("train", "cat", "b.png")] = np.asarray(Image.fromarray(rgb).convert("L"))
    save(os.path.join(root, "train", "DOG", "c.png"), np.full((5, 6), 128, np.uint8), format="JPEG")
    expected[os.path.join("train", "DOG", "c.png")] = np.full((5, 6), 128, np.uint8)
    open(os.path.join(root, "train", "DOG", "notes.txt"), "w").write("not an image")  # not listed
    return expected


def test_folder_decodes_by_content_and_converts_to_the_datasets_channels(tmp_path):
    root = str(tmp_path / "data")
    expected = make_folder(root)
    with open(os.path.join(root, "train", "DOG", "c.png"), "rb") as f:
        assert f.read(2) == b"\xff\xd8"  # a JPEG, named .png
    config = make_config(name="folder", data_dir=root)
    assert dd.get_info(config) == ip.DatasetInfo(2, (5, 6, 1), 6, 4)
    for split, count in (("train", 3), ("test", 2)):
        images, labels = dd.load_split(config, split)
        assert images.shape == (2 * count, 5, 6, 1) and images.dtype == np.uint8
        rels = [os.path.join(split, label, "abc"[i] + ".png") for label in ("DOG", "cat") for i in range(count)]
        np.testing.assert_array_equal(labels, [0] * count + [1] * count)  # sorted labels, files by name
        for image, rel in zip(images, rels):
            tolerance = 2 if rel.endswith(os.path.join("DOG", "c.png")) else 0  # JPEG
            np.testing.assert_allclose(image[..., 0], expected[rel], atol=tolerance, err_msg=rel)
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        dd.load_split(config, "val")


def test_folder_channels_are_the_first_images_and_rgb_converts(tmp_path):
    root = str(tmp_path / "rgb")
    rgba = np.random.default_rng(0).integers(0, 256, (4, 3, 4), dtype=np.uint8)
    save(os.path.join(root, "train", "x", "a.png"), rgba[..., :3])
    save(os.path.join(root, "train", "x", "b.png"), rgba)  # RGBA -> RGB: alpha dropped
    save(os.path.join(root, "train", "y", "a.png"), rgba[..., 0])  # grey -> RGB
    save(os.path.join(root, "test", "y", "a.png"), rgba[..., :3])
    config = make_config(name="folder", data_dir=root)
    assert dd.get_info(config) == ip.DatasetInfo(2, (4, 3, 3), 3, 1)
    images, labels = dd.load_split(config, "train")
    np.testing.assert_array_equal(images[0], rgba[..., :3])
    np.testing.assert_array_equal(images[1], rgba[..., :3])
    np.testing.assert_array_equal(images[2], np.repeat(rgba[..., :1], 3, -1))
    np.testing.assert_array_equal(labels, [0, 0, 1])


def make_shuffled_first_rgb_folder(root):
    """The channels are those of ImageFolder's first image (its list shuffled by random.Random(split)),
    not the first by name: here that one is RGB, all others grey."""
    order = list(range(10))
    random.Random("test").shuffle(order)
    assert order[0] != 0  # else the first by name would be it too
    for i in range(10):
        pixels = np.full((4, 4), i, np.uint8)
        save(os.path.join(root, "test", "x", f"{i}.png"), np.stack([pixels] * 3, -1) if i == order[0] else pixels)
    save(os.path.join(root, "train", "x", "0.png"), np.zeros((4, 4), np.uint8))
    return order[0]


def test_folder_channels_come_from_image_folders_first_image(tmp_path):
    root = str(tmp_path / "shuffled")
    make_shuffled_first_rgb_folder(root)
    config = make_config(name="folder", data_dir=root)
    assert dd.get_info(config).image_shape == (4, 4, 3)
    images, _ = dd.load_split(config, "test")
    np.testing.assert_array_equal(images, np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None],
                                                          (10, 4, 4, 3)))


def test_folder_cache_is_written_reused_and_keyed_by_the_files(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    make_folder(root)
    config = make_config(name="folder", data_dir=root)
    first = dd.load_split(config, "train", cache_dir=cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("folder-train-") and files[0].endswith(".npz")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        again = dd.load_split(config, "train", cache_dir=cache)
        with pytest.raises(ValueError, match="decoded although cached"):  # the patch does bite
            dd.load_split(config, "test", cache_dir=cache)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(cache)) == files  # no new file, no temporary left

    save(os.path.join(root, "train", "DOG", "d.png"), np.zeros((5, 6), np.uint8))  # an added file
    images, labels = dd.load_split(config, "train", cache_dir=cache)
    assert len(labels) == 7 and len(os.listdir(cache)) == 2
    os.remove(os.path.join(root, "train", "DOG", "d.png"))  # removed again: the first key
    assert len(dd.load_split(config, "train", cache_dir=cache)[1]) == 6 and len(os.listdir(cache)) == 2
    save(os.path.join(root, "train", "DOG", "a.png"), np.random.default_rng(0).integers(0, 256, (5, 6), np.uint8))
    changed = dd.load_split(config, "train", cache_dir=cache)[0]  # a changed file
    assert len(os.listdir(cache)) == 3 and not np.array_equal(changed, first[0])
    # the channels come from test/'s first image (ImageFolder order): an RGB one there changes train's
    source = dd._folder_first_image(root, dd._folder_index(root)[0])
    assert source.startswith("test")
    save(os.path.join(root, source), np.zeros((5, 6, 3), np.uint8))
    assert dd.load_split(config, "train", cache_dir=cache)[0].shape == (6, 5, 6, 3) and len(os.listdir(cache)) == 4


def test_folder_broken_and_odd_sized_images_are_named(tmp_path):
    root = str(tmp_path / "broken")
    for name in ("a.png", "b.png"):
        save(os.path.join(root, "train", "x", name), np.zeros((5, 6), np.uint8))
    bad = os.path.join(root, "train", "x", "b.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(ip.BadDataError, match="cannot decode .*b.png"):
        dd.load_split(make_config(name="folder", data_dir=root), "train")
    save(bad, np.zeros((7, 6), np.uint8))
    with pytest.raises(ValueError, match=r"same size \(H, W\) = \(5, 6\).*b.png has \(H, W\) = \(7, 6\)"):
        dd.load_split(make_config(name="folder", data_dir=root), "train")
    with pytest.raises(ValueError, match="existing directory"):
        dd.load_split(make_config(name="folder", data_dir=str(tmp_path / "missing")), "train")


def test_folder_labels_and_channels_are_the_tf_data_paths(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf
    root = str(tmp_path / "data")
    make_folder(root)
    os.makedirs(os.path.join(root, "test", "Ant"))  # a label with no images, in one split only
    builder = ip._image_folder(root)
    splits, names = dd._folder_index(root)
    assert names == builder.info.features["label"].names == ["Ant", "DOG", "cat"]
    assert dd.get_info(make_config(name="folder", data_dir=root)).image_shape == ip._folder_first_image_shape(root)
    for split in ("train", "test"):
        images, labels = dd.load_split(make_config(name="folder", data_dir=root), split)
        ours = {os.path.join(root, rel): (label, image)
                for (rel, _), label, image in zip(splits[split], labels, images)}
        theirs = builder._split_examples[split]
        assert sorted(ours) == sorted(e.image_path for e in theirs)
        for e in theirs:
            label, image = ours[e.image_path]
            assert label == builder.info.features["label"].str2int(e.label)
            decoded = tf.io.decode_image(tf.io.read_file(e.image_path), channels=1, expand_animations=False).numpy()
            np.testing.assert_allclose(image, decoded, atol=2, err_msg=e.image_path)
    shuffled = str(tmp_path / "shuffled")
    make_shuffled_first_rgb_folder(shuffled)
    assert dd.get_info(make_config(name="folder", data_dir=shuffled)).image_shape == \
        ip._folder_first_image_shape(shuffled) == (4, 4, 3)


def test_tfds_name_loads_the_whole_split_as_the_tf_data_path_reads_it(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[24], num_bytes=0) for s in ("train", "test")]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    config = make_config(name="cifar10", data_dir=str(tmp_path), augment="cifar", image_size=32, cache=False)
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        assert dd.get_info(config) == ip.DatasetInfo(10, (32, 32, 3), 24, 24)
        images, labels = dd.load_split(config, "test")
        (batch,) = ip.eval_iterator(config, batch_size=24, process_index=0, process_count=1)
        with pytest.raises(ValueError, match="available splits"):
            dd.load_split(config, "validation")
    assert images.dtype == np.uint8 and images.shape == (24, 32, 32, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, batch["image"])
    np.testing.assert_array_equal(labels, batch["label"])


# ----------------------------------------------------------------------------- without TensorFlow


WITHOUT_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(name + " is blocked")
        return None

sys.meta_path.insert(0, NoTensorFlow())
import ml_collections
from edgepopup_jax.training import device_data as dd
try:
    import tensorflow
except ImportError:
    pass
else:
    raise AssertionError("the block does not work")
for name, data_dir, num_train in (("mnist5k", None, 4000), ("npz", NPZ, 20), ("folder", FOLDER, 6)):
    config = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir, train_split="train",
                                            eval_split="test", augment="cifar"))
    info = dd.get_info(config, cache_dir=CACHE)
    images, labels = dd.load_split(config, "train", cache_dir=CACHE)
    assert info.num_train == len(labels) == len(images) == num_train, (name, info)
    assert images.shape[1:] == info.image_shape, (name, info)
    assert dd.resolve_pipeline(config, info, None) == "tf_data"
    config.pipeline = "auto"
    assert dd.resolve_pipeline(config, None, None) == "device"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
assert not loaded, loaded
print("without tensorflow ok")
"""


def test_in_memory_sources_work_without_tensorflow(tmp_path):
    folder, npz = str(tmp_path / "data"), str(tmp_path / "d.npz")
    make_folder(folder)
    write_npz(npz)
    code = f"NPZ, FOLDER, CACHE = {npz!r}, {folder!r}, {str(tmp_path / 'cache')!r}\n" + WITHOUT_TENSORFLOW
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                                                      "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without tensorflow ok" in proc.stdout
    assert len(os.listdir(tmp_path / "cache")) == 1


# ----------------------------------------------------------------------------- pipeline choice


class FakeDevice:
    platform = "gpu"

    def __init__(self, bytes_limit):
        self.bytes_limit = bytes_limit

    def memory_stats(self):
        return {"bytes_limit": self.bytes_limit}


def test_resolve_pipeline():
    info = dd.get_info(make_config())
    size = dd.nbytes(info)
    assert dd.resolve_pipeline(make_config(), info, jax.devices()) == "tf_data"  # the default
    with pytest.raises(ValueError, match=r"pipeline='gpu'.*\['auto', 'device', 'tf_data'\]"):
        dd.resolve_pipeline(make_config(pipeline="gpu"), info, jax.devices())
    assert dd.resolve_pipeline(make_config(pipeline="device", augment="cifar"), info, jax.devices()) == "device"
    with pytest.raises(ValueError, match="imagenet"):
        dd.resolve_pipeline(make_config(pipeline="device", augment="imagenet"), info, jax.devices())
    assert dd.resolve_pipeline(make_config(pipeline="tf_data", augment="imagenet"), info, None) == "tf_data"

    auto = make_config(pipeline="auto")
    assert dd.resolve_pipeline(auto, None, jax.devices()) == "device"  # CPU: the host's memory
    assert dd.resolve_pipeline(make_config(pipeline="auto", device_memory_fraction=1e-12), info,
                               jax.devices()) == "tf_data"
    assert dd.resolve_pipeline(make_config(pipeline="auto", augment="imagenet"), info, jax.devices()) == "tf_data"
    assert dd.resolve_pipeline(auto, info, [FakeDevice(4 * size)]) == "device"  # exactly 0.25
    assert dd.resolve_pipeline(auto, info, [FakeDevice(4 * size - 4)]) == "tf_data"
