"""Images that do not decode (data.bad_images, data.max_bad_fraction, the check_data command).

A folder of 28x28 grey PNGs with the three broken kinds planted among them (a truncated PNG, a
zero-byte file, a text file named .png) and three odd but good ones (a JPEG named .png, an RGB
PNG and a CMYK JPEG in the grey data set): the broken ones are named or skipped, on both
pipelines, through main.py and check_data as a user meets them; the odd ones are trained on.
"""
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from edgepopup_jax.training import device_data as dd
from edgepopup_jax.training import input_pipeline as ip

ROOT = pathlib.Path(__file__).resolve().parents[1]
BROKEN = ("train/a/truncated.png", "train/b/empty.png", "train/b/text.png")
ODD = {"train/a/jpeg.png": "JPEG", "train/b/rgb.png": "RGB", "train/a/cmyk.png": "CMYK",
       "test/a/jpeg.png": "JPEG", "test/b/rgb.png": "RGB"}
GOOD = {"train": 20, "test": 4}  # constant grey PNGs per label


def plant(root, broken=True) -> dict:
    """The folder; returns {relative path: the grey value it decodes to} of the images that decode
    (every one constant, each value distinct)."""
    values, v = {}, 10
    for split, n in GOOD.items():
        for label in ("a", "b"):
            os.makedirs(os.path.join(root, split, label))
            for k in range(n):
                values[f"{split}/{label}/{k}.png"] = v
                Image.fromarray(np.full((28, 28), v, np.uint8)).save(os.path.join(root, split, label, f"{k}.png"))
                v += 2
    for rel, kind in ODD.items():
        v += 2
        if kind == "RGB":  # a colour whose grey (ITU-R 601-2) is v
            Image.fromarray(np.full((28, 28, 3), v, np.uint8)).save(os.path.join(root, rel), format="PNG")
        else:
            image = Image.fromarray(np.full((28, 28), v, np.uint8))
            (image.convert("CMYK") if kind == "CMYK" else image).save(os.path.join(root, rel), format="JPEG")
        values[rel] = v
    if broken:
        png = open(os.path.join(root, "train/a/0.png"), "rb").read()
        open(os.path.join(root, BROKEN[0]), "wb").write(png[: len(png) // 2])
        open(os.path.join(root, BROKEN[1]), "wb").close()
        open(os.path.join(root, BROKEN[2]), "w").write("not an image, named .png\n")
    return values


def data_config(root, **overrides):
    return ml_collections.ConfigDict({
        "name": "folder", "data_dir": str(root), "train_split": "train", "eval_split": "test",
        "augment": "none", "image_size": 28, "mean": (0.0,), "std": (1.0,), "shuffle_buffer": 64,
        "cache": True, "bad_images": "skip", "max_bad_fraction": 0.1, **overrides})


def broken_paths(root):
    return {os.path.join(str(root), rel) for rel in BROKEN}


@pytest.mark.parametrize("overrides, match", [
    ({"bad_images": "ignore"}, r"data.bad_images='ignore'; allowed: \['error', 'skip'\]"),
    ({"max_bad_fraction": -0.1}, r"data.max_bad_fraction must be a number in \[0, 1\]"),
    ({"max_bad_fraction": 1.5}, r"data.max_bad_fraction must be a number in \[0, 1\]"),
    ({"max_bad_fraction": "0.1"}, r"data.max_bad_fraction must be a number in \[0, 1\]"),
])
def test_the_options_are_checked_by_both_pipelines(tmp_path, overrides, match):
    plant(str(tmp_path), broken=False)
    for get_info in (ip.get_info, dd.get_info):
        with pytest.raises(ValueError, match=match):
            get_info(data_config(tmp_path, **overrides))


@pytest.mark.parametrize("cache", [True, False])
def test_tf_data_skips_the_broken_and_decodes_the_odd_by_content(tmp_path, cache):
    values = plant(str(tmp_path))
    config = data_config(tmp_path, cache=cache)
    bad = ip.BadExamples(config)
    info = ip.get_info(config)
    assert info.image_shape == (28, 28, 1) and info.num_train == 40 + 3 + 3
    it = ip.train_iterator(config, batch_size=8, seed=0, process_index=0, process_count=1, bad=bad)
    steps = info.num_train // 8
    epochs = [[next(it) for _ in range(steps)] for _ in range(4)]  # each epoch keeps its 5 batches
    seen = {int(v) for epoch in epochs for b in epoch for v in b["image"][:, 0, 0, 0]}
    train_values = {v for rel, v in values.items() if rel.startswith("train")}
    assert seen <= {v + d for v in train_values for d in (-1, 0, 1)}  # JPEG: within 1
    for rel in ("train/a/jpeg.png", "train/b/rgb.png", "train/a/cmyk.png"):
        assert values[rel] in seen or values[rel] + 1 in seen or values[rel] - 1 in seen, rel
    evals = list(ip.eval_iterator(config, batch_size=16, process_index=0, process_count=1, bad=bad))
    assert sum(b["valid"].sum() for b in evals) == 2 * GOOD["test"] + 2  # the odd ones evaluated
    assert set(bad.all_names()) == broken_paths(tmp_path) and bad.count == 3


def test_device_path_skips_the_broken_and_remembers_them_in_its_cache(tmp_path):
    values = plant(str(tmp_path / "data"))
    config = data_config(tmp_path / "data")
    for _ in range(2):  # decoded, then read from the cache
        bad = ip.BadExamples(config)
        images, labels = dd.load_split(config, "train", cache_dir=str(tmp_path / "cache"), bad=bad)
        assert set(bad.all_names()) == broken_paths(tmp_path / "data")
        assert images.shape == (43, 28, 28, 1) and len(labels) == 43
        expected = sorted(v for rel, v in values.items() if rel.startswith("train"))
        np.testing.assert_allclose(sorted(images[:, 0, 0, 0].astype(int)), expected, atol=1)
    with pytest.raises(ip.BadDataError, match="cannot decode .*truncated.png"):  # cached, still named
        dd.load_split(data_config(tmp_path / "data", bad_images="error"), "train", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ip.BadDataError, match=r"3 of the 46 examples of split 'train' do not decode, more than "
                                              r"data.max_bad_fraction=0.05"):
        dd.load_split(data_config(tmp_path / "data", max_bad_fraction=0.05), "train")


# ----------------------------------------------------------------------------- through the commands

MAIN_ARGS = ["--config=configs/default.py", "--config.data.name=folder", "--config.batch_size=8",
             "--config.num_epochs=2", "--config.eval_batch_size=16", "--config.log_every_steps=1"]


def _start(argv):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _run(argv):
    return _wait(_start(argv))


def _main(data, workdir, *overrides):
    return _run(["main.py", *MAIN_ARGS, f"--config.data.data_dir={data}", f"--workdir={workdir}", *overrides])


def _error_line(code, err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_tf_data_error_names_the_file_after_saving_the_state_and_skip_resumes_from_it(tmp_path):
    data = tmp_path / "data"
    plant(str(data))
    tf_data = ["--config.data.pipeline=tf_data", "--config.data.cache=False", "--config.data.shuffle_buffer=1"]
    code, _, err = _main(data, tmp_path / "w", *tf_data)
    line = _error_line(code, err)
    named = [p for p in broken_paths(data) if p in line]
    assert len(named) == 1 and line.startswith(f"error: cannot decode {named[0]}"), line
    saved = sorted(int(s.name) for s in (tmp_path / "w" / "checkpoints").iterdir() if s.name.isdigit())
    assert len(saved) == 1 and f"Stopping at step {saved[0]} (data that does not decode)" in err
    assert not (tmp_path / "w" / "results.json").exists()
    # The state saved is a good one: the same run with bad_images=skip resumes from it and finishes.
    code, out, err = _main(data, tmp_path / "w", *tf_data, "--config.data.bad_images=skip",
                           "--config.data.max_bad_fraction=0.1")
    assert code == 0, err[-3000:]
    assert f"Resumed from step {saved[0]}" in err
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["skipped_examples"] == 3 and set(results["skipped_files"]) == broken_paths(data)
    assert results["step"] == 10 and results["eval"]["count"] == 2 * GOOD["test"] + 2


def test_device_error_names_the_file_before_training(tmp_path):
    data = tmp_path / "data"
    plant(str(data))
    code, _, err = _main(data, tmp_path / "w", "--config.data.pipeline=device")
    line = _error_line(code, err)
    assert line.startswith(f"error: cannot decode {data / BROKEN[0]}"), line  # the first: labels, then names
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("pipeline", ["tf_data", "device"])
def test_skip_trains_on_the_rest_and_counts_the_skipped(tmp_path, pipeline):
    data = tmp_path / "data"
    plant(str(data))
    code, out, err = _main(data, tmp_path / "w", f"--config.data.pipeline={pipeline}",
                           "--config.data.bad_images=skip", "--config.data.max_bad_fraction=0.1")
    assert code == 0, err[-3000:]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["skipped_examples"] == 3 and set(results["skipped_files"]) == broken_paths(data)
    assert results["eval"]["count"] == 2 * GOOD["test"] + 2  # the JPEG named .png and the RGB image
    assert all(f"skipping {p}: it does not decode" in err for p in broken_paths(data))
    # 43 good train examples, 5 steps of 8 per epoch: the epochs kept their length
    assert results["step"] == results["total_steps"] == 10


@pytest.mark.parametrize("pipeline", ["tf_data", "device"])
def test_more_bad_than_max_bad_fraction_stops_naming_the_files(tmp_path, pipeline):
    data = tmp_path / "data"
    plant(str(data))
    code, _, err = _main(data, tmp_path / "w", f"--config.data.pipeline={pipeline}",
                         "--config.data.bad_images=skip", "--config.data.max_bad_fraction=0.05")
    line = _error_line(code, err)
    assert "3 of the 46 examples of split 'train' do not decode, more than data.max_bad_fraction=0.05" in line
    assert all(p in line for p in broken_paths(data)), line


def test_check_data_lists_exactly_the_broken_files_and_exits_1_and_0_when_clean(tmp_path):
    plant(str(tmp_path / "broken"))
    plant(str(tmp_path / "clean"), broken=False)
    procs = {name: _start(["-m", "edgepopup_jax.check_data", "--config=configs/default.py",
                           "--config.data.name=folder", f"--config.data.data_dir={tmp_path / name}"])
             for name in ("broken", "clean")}  # at once
    runs = {name: _wait(p) for name, p in procs.items()}
    code, out, err = runs["broken"]
    assert code == 1, err[-3000:]
    listed = {line.split("\t")[0] for line in out.splitlines()}
    assert listed == broken_paths(tmp_path / "broken"), out
    assert "train: 46 / 46 checked (100%), 3 bad" in err and "3 of 56 examples do not decode" in err
    code, out, err = runs["clean"]
    assert code == 0 and out == "" and "all 53 examples decode" in err, err[-3000:]
