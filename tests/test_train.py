"""The trainer end to end on the embedded MNIST-5k default: accuracy, devices, resume, errors."""
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.configs import default  # noqa: E402
from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop, sources
from edgepopup_jax.training import evaluation, input_pipeline, train  # noqa: E402
from edgepopup_jax.planning import grid  # noqa: E402


def small_config(**overrides):
    c = default.get_config()
    c.num_train_steps = 8
    c.log_every_steps = 1
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.batch_size = 32
    c.eval_batch_size = 200
    c.data.pipeline = "tf_data"  # a stream: these tests reach into the tf.data input
    return grid.with_overrides(c, overrides)


def one_device():
    return jax.devices()[:1]


def losses(results):
    return np.array([h["loss"] for h in results["train_history"]])


def dir_digest(path):
    """Hash of every file's path and bytes under path: equal digests mean an untouched tree."""
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_default_config_learns_mnist5k(tmp_path):
    c = default.get_config()
    c.num_epochs = 3
    results = loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    assert results["eval"]["count"] == 1000
    assert results["eval"]["top1"] > 0.85, results["eval"]
    assert results["weights_kept"] == 133_100 and results["weights_total"] == 266_200
    saved = (tmp_path / "results.json").read_text()
    assert '"top1"' in saved and "frozen_sha256" in saved
    assert list((tmp_path).glob("events.out.tfevents.*")), "no TensorBoard event file"


WALL_CLOCK = ("wall_time_sec", "images_per_sec", "resumed_from")  # (and what this invocation did)


def test_resumed_run_ends_in_exactly_the_uninterrupted_state(tmp_path):
    """Stopped at an eval step (saved before its evaluation) and resumed: the same state, and a
    results.json equal to the uninterrupted run's but for wall-clock fields, history included."""
    c = small_config(**{"num_train_steps": 10, "checkpoint_every_steps": 4, "eval_every_steps": 5})
    straight = loop.train_and_evaluate(c, str(tmp_path / "straight"), devices=one_device())
    part = loop.train_and_evaluate(c, str(tmp_path / "resumed"), devices=one_device(),
                                    stop_after_steps=5)
    assert part["preempted"] and part["step"] == 5
    rest = loop.train_and_evaluate(c, str(tmp_path / "resumed"), devices=one_device())
    assert rest["step"] == 10 and [h["step"] for h in rest["train_history"]] == list(range(1, 11))
    assert [e["step"] for e in rest["eval_history"]] == [5, 10]
    assert rest["state_sha256"] == straight["state_sha256"]
    np.testing.assert_array_equal(losses(rest), losses(straight))
    saved = {name: json.loads((tmp_path / name / "results.json").read_text())
             for name in ("straight", "resumed")}
    for r in saved.values():
        for key in WALL_CLOCK:
            r.pop(key)
    assert saved["resumed"] == saved["straight"]
    again = loop.train_and_evaluate(c, str(tmp_path / "resumed"), devices=one_device())
    assert again["step"] == 10 and again["train_history"] == straight["train_history"]
    assert again["eval"] == straight["eval"] and again["eval_history"] == straight["eval_history"]


def test_frozen_weights_do_not_change_and_kept_counts_are_exact(tmp_path):
    c = small_config(**{"model.keep_fraction": 0.3})
    results = loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    for layer in results["layers"]:
        assert layer["kept"] == layer["total"] - int(0.7 * layer["total"])
    # The saved final state: frozen bit-identical to a fresh init from the seed, scores moved.
    model = train.build_model(c, 10)
    tx = train.optim.make_optimizer(c.optim, lambda step: 0.1)
    # jitted, as the trainer inits (op by op, the init would compile every primitive apart)
    fresh = jax.jit(lambda: train.create_state(model, tx, (28, 28, 1), c.seed))()
    final, _ = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).restore(fresh, {})
    assert int(final.step) == 8
    for a, b in zip(jax.tree.leaves(fresh.frozen), jax.tree.leaves(final.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ckpt_lib.tree_hash(final.frozen) == results["frozen_sha256"]
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh.params),
                                                        jax.tree.leaves(final.params))]
    assert all(moved)


@pytest.mark.parametrize("override, message", [
    ({"data.name": "no_such_dataset"}, "no_such_dataset"),
    ({"model.name": "conv5"}, "conv5"),
    ({"data.name": "folder", "data.data_dir": None}, "data_dir"),
    ({"model.keep_fraction": 1.5}, "(0, 1]"),
    ({"model.weight_init": "he_normal"}, "he_normal"),
    ({"optim.name": "lamb"}, "lamb"),
])
def test_bad_config_fails_before_writing(tmp_path, override, message):
    c = small_config(**override)
    with pytest.raises(ValueError, match=None) as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=one_device())
    assert message in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _trained_workdir(tmp_path, **overrides):
    workdir = tmp_path / "run"
    c = small_config(**{"num_train_steps": 4, "checkpoint_every_steps": 2, **overrides})
    loop.train_and_evaluate(c, str(workdir), devices=one_device())
    return c, workdir


def test_incompatible_checkpoint_is_refused_and_left_untouched(tmp_path):
    c, workdir = _trained_workdir(tmp_path)
    before = dir_digest(workdir / "checkpoints")
    other = small_config(**{"num_train_steps": 6, "model.keep_fraction": 0.3})
    with pytest.raises(ckpt_lib.CheckpointError, match="keep_fraction"):
        loop.train_and_evaluate(other, str(workdir), devices=one_device())
    assert dir_digest(workdir / "checkpoints") == before


def test_corrupt_checkpoint_is_refused_and_left_untouched(tmp_path):
    c, workdir = _trained_workdir(tmp_path, **{"checkpoint.on_corrupt": "refuse"})
    latest = max((workdir / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate the array data
    before = dir_digest(workdir / "checkpoints")
    c.num_train_steps = 6
    with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint 4"):
        loop.train_and_evaluate(c, str(workdir), devices=one_device())
    assert dir_digest(workdir / "checkpoints") == before


def _main(args, **kwargs):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_override_of_a_missing_key_fails_with_a_clear_message(tmp_path):
    p = _main(["--config=configs/default.py", f"--workdir={tmp_path}", "--config.model.no_such_key=3"])
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "no_such_key" in out
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
    p = _main(["--config=configs/default.py", f"--workdir={tmp_path}", "--config.log_every_steps=5",
               "--config.num_epochs=50"])
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "step 20/" in line:
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert "SIGTERM" in out
    saved = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
    assert saved is not None and saved >= 20
    c = default.get_config()
    c.num_epochs = 50
    c.num_train_steps = saved + 2
    c.log_every_steps = 1
    # same config as the killed run except the length: the schedule changes, the checkpoint fits
    resumed = loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    assert [h["step"] for h in resumed["train_history"]][-2:] == [saved + 1, saved + 2]
    assert resumed["train_history"][0]["step"] == 5  # the killed run's history, kept
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("model, device_counts", [
    ({"model.name": "fc"}, (1, 6, 8)),
    # A (narrow) ResNet has BatchNorm: its statistics must be over the global batch, so even the
    # first loss would differ between device counts if each device normalised its own examples.
    # Two stages of one block each (the stem, an identity and a strided projection shortcut: 6
    # BatchNorms) show that as well as all 8 blocks would, at half the compile time; and one
    # split (6 devices) shows it as well as two.
    ({"model.name": "cifar_resnet18", "model.width": 0.125, "model.stage_sizes": [1, 1]}, (1, 6)),
])
def test_any_device_count_trains_evaluates_checkpoints_and_resumes(tmp_path, model, device_counts):
    """1, 6 and 8 devices (the ResNet: 1 and 6) with the shipped eval batch (500, which 6 and 8
    do not divide): every one of the 1,000 eval examples is counted once, a stopped run resumes
    to the end, and the device counts give the same losses (the first step to 1e-6; later ones
    to 1e-4, since float reassociation can flip a near-threshold mask entry) and frozen weights."""
    c = small_config(**{"num_train_steps": 4, "batch_size": 48, "eval_batch_size": 500,
                        "eval_every_steps": 2, "checkpoint_every_steps": 2,
                        "optim.learning_rate": 0.01, **model})
    assert default.get_config().eval_batch_size == 500
    evals = {}
    for n in device_counts:
        workdir = str(tmp_path / f"d{n}")
        part = loop.train_and_evaluate(c, workdir, devices=jax.devices()[:n], stop_after_steps=3)
        assert part["preempted"] and part["step"] == 3 and part["num_devices"] == n
        assert part["eval"]["count"] == 1000  # the eval at step 2
        rest = loop.train_and_evaluate(c, workdir, devices=jax.devices()[:n])
        assert rest["step"] == 4 and [h["step"] for h in rest["train_history"]] == [1, 2, 3, 4]
        assert rest["eval"]["count"] == 1000 and rest["data_order_changed"] is None
        evals[n] = rest
    one = evals[1]
    for n in device_counts[1:]:
        assert evals[n]["frozen_sha256"] == one["frozen_sha256"]
        np.testing.assert_allclose(losses(evals[n])[0], losses(one)[0], rtol=1e-6)
        np.testing.assert_allclose(losses(evals[n]), losses(one), rtol=1e-4)
        np.testing.assert_allclose(evals[n]["eval"]["loss"], one["eval"]["loss"], rtol=2e-3)


def test_eval_batch_is_split_for_any_mesh():
    from edgepopup_jax.training import sharding
    for n, expect in ((1, 500), (3, 501), (6, 504), (7, 504), (8, 504)):
        mesh = sharding.make_mesh(jax.devices()[:n])
        assert sharding.eval_batch_sizes(500, mesh) == (expect, expect)  # (this process, global)
    with pytest.raises(ValueError, match="eval_batch_size must be positive"):
        sharding.eval_batch_sizes(0, sharding.make_mesh(jax.devices()[:1]))


def test_train_batch_that_cannot_split_is_refused_before_writing(tmp_path):
    c = small_config(batch_size=50)
    with pytest.raises(ValueError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:8])
    assert "8 devices" in str(e.value) and "48 or 56" in str(e.value)
    assert not (tmp_path / "run").exists()
    c = small_config(batch_size=4)
    with pytest.raises(ValueError, match="nearest that work are 8"):
        loop.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:8])
    assert not (tmp_path / "run").exists()


def test_epoch_checkpoint_is_saved_before_evaluation(tmp_path, monkeypatch):
    c = small_config(**{"num_train_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2})

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(sources.StreamSource, "eval_chunks", broken_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    # The epoch's training is not lost: its checkpoint was written before the evaluation.
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    assert [h["step"] for h in resumed["train_history"]] == [1, 2, 3, 4]
    assert [e["step"] for e in resumed["eval_history"]] == [2, 4]  # step 2's evaluation rerun


def test_checkpoint_from_before_an_added_model_option_still_resumes(tmp_path):
    """Checkpoints written before `model.mask_scope` existed belong to a mask_scope='layer' run."""
    c = small_config(**{"num_train_steps": 4, "checkpoint_every_steps": 2})
    loop.train_and_evaluate(c, str(tmp_path), devices=one_device(), stop_after_steps=2)
    meta_file = next((tmp_path / "checkpoints" / "2" / "meta").rglob("*"))
    import json
    meta = json.loads(meta_file.read_text())
    del meta["model"]["mask_scope"]  # as an older checkpoint's meta
    meta_file.write_text(json.dumps(meta))
    rest = loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    assert rest["step"] == 4
    c.model.mask_scope = "global"
    c.num_train_steps = 6
    with pytest.raises(ckpt_lib.CheckpointError, match="mask_scope"):
        loop.train_and_evaluate(c, str(tmp_path), devices=one_device())


def test_divergence_stops_the_run_and_is_never_saved(tmp_path):
    c = small_config(**{"model.mask": "dense", "optim.learning_rate": 1e12, "num_train_steps": 40,
                        "log_every_steps": 10, "checkpoint_every_steps": 5})
    with pytest.raises(train.TrainingDiverged, match=r"training diverged at step \d+") as e:
        loop.train_and_evaluate(c, str(tmp_path), devices=one_device())
    bad_step = int(str(e.value).split("step ")[1].split(":")[0])
    latest = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
    assert latest is None or latest < bad_step
    if latest is not None:  # every saved state is finite
        model = train.build_model(c, 10)
        tx = train.optim.make_optimizer(c.optim, lambda step: 0.1)
        fresh = jax.jit(lambda: train.create_state(model, tx, (28, 28, 1), c.seed))()
        saved, _ = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).restore(fresh, {})
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(saved.params))


def test_cli_exits_1_with_a_message_when_training_diverges(tmp_path):
    p = _main(["--config=configs/default.py", f"--workdir={tmp_path}", "--config.model.mask=dense",
               "--config.optim.learning_rate=1e12", "--config.num_train_steps=30",
               "--config.log_every_steps=10"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1, out[-3000:]
    assert "error: training diverged at step" in out and "Traceback" not in out


def test_supermask_sample_evaluation_runs_and_is_deterministic(tmp_path):
    c = small_config(**{"model.mask": "supermask", "model.supermask_eval": "sample",
                        "num_train_steps": 2})
    first = loop.train_and_evaluate(c, str(tmp_path / "a"), devices=one_device())
    again = loop.train_and_evaluate(c, str(tmp_path / "b"), devices=jax.devices()[:2])
    assert first["eval"]["count"] == 1000 and 0 <= first["eval"]["top1"] <= 1
    np.testing.assert_allclose(first["eval"]["loss"], again["eval"]["loss"], rtol=1e-5)
    # The same trained state evaluated as a sample is neither its threshold mask nor its
    # expectation, which a stub for either would be.
    for other in ("threshold", "expectation"):
        o = loop.train_and_evaluate(grid.with_overrides(c, {"model.supermask_eval": other}),
                                     str(tmp_path / other), devices=one_device())
        assert o["state_sha256"] == first["state_sha256"]  # the eval mode does not train
        assert abs(o["eval"]["loss"] - first["eval"]["loss"]) > 1e-4 * first["eval"]["loss"], other


def test_flipped_byte_in_a_checkpoint_is_caught_by_its_checksum(tmp_path):
    c, workdir = _trained_workdir(tmp_path, **{"checkpoint.on_corrupt": "refuse"})
    latest = workdir / "checkpoints" / "4"
    largest = max((f for f in (latest / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x5A
    largest.write_bytes(bytes(data))
    before = dir_digest(workdir / "checkpoints")
    c.num_train_steps = 6
    # Usually the flip lands in array data, which orbax restores silently: the checksum catches
    # it. (Should it hit orbax's own index instead, the checkpoint is refused as unreadable, or,
    # where the damaged index still parses but names other shapes, as not this model's.)
    with pytest.raises(ckpt_lib.CheckpointError,
                       match="checkpoint 4 .*(corrupted|unreadable|could not be restored)"):
        loop.train_and_evaluate(c, str(workdir), devices=one_device())
    assert dir_digest(workdir / "checkpoints") == before


def test_periodic_actions_are_due_every_n_steps_and_at_the_last():
    every = train.Intervals(total=10, log=4, eval=3, checkpoint=10)
    assert [s for s in range(1, 11) if every.due(s, every.log)] == [4, 8, 10]
    assert [s for s in range(1, 11) if every.due(s, every.eval)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if every.due(s, every.checkpoint)] == [10]


def test_checksum_mismatch_is_refused(tmp_path):
    c, workdir = _trained_workdir(tmp_path, **{"checkpoint.on_corrupt": "refuse"})
    meta_file = next((workdir / "checkpoints" / "4" / "meta").rglob("*"))
    meta = json.loads(meta_file.read_text())
    assert meta["format"] == ckpt_lib.FORMAT_VERSION and len(meta["checksum"]) > 5
    # The meta is exactly the written format: RunMeta's fields plus what save adds.
    run_fields = {f.name for f in dataclasses.fields(ckpt_lib.RunMeta)}
    assert set(meta) == run_fields | {"format", "checksum"}
    run_meta = {k: meta[k] for k in run_fields}
    assert ckpt_lib.RunMeta.from_json(meta).to_json() == run_meta
    assert [h["step"] for h in meta["history"]["train"]] == [1, 2, 3, 4] and meta["process_count"] == 1
    meta["checksum"][3] = (meta["checksum"][3] + 1) % 2**32  # as if that array's data changed
    meta_file.write_text(json.dumps(meta))
    c.num_train_steps = 6
    with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint 4 .* is corrupted") as e:
        loop.train_and_evaluate(c, str(workdir), devices=one_device())
    assert "checksum" in str(e.value)


def _resnet_eval_reference(variables, x, keep_fraction, running_stats=True):
    """float64 numpy logits of cifar_resnet18 with stage_sizes (1, 1): in eval mode every BN
    normalises with its running statistics, (x - mean) / sqrt(var + 1e-5); running_stats=False
    uses the batch's statistics instead (train mode)."""
    def layer(path):
        scores, kernel = variables["params"], variables["frozen"]
        for p in path:
            scores, kernel = scores[p], kernel[p]
        s = np.abs(np.asarray(scores["scores"])).reshape(-1)
        keep = np.zeros(s.size)
        keep[np.argsort(-s, kind="stable")[:s.size - int((1 - keep_fraction) * s.size)]] = 1
        return np.asarray(kernel["kernel"], np.float64) * keep.reshape(kernel["kernel"].shape)

    def conv(x, path, stride=1):  # NHWC, HWIO, padding k // 2
        w = layer(path)
        k = w.shape[0]
        x = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
        h = (x.shape[1] - k) // stride + 1
        return sum(x[:, i:i + stride * h:stride, j:j + stride * h:stride] @ w[i, j]
                   for i in range(k) for j in range(k))

    def bn(x, path):
        stats = variables["batch_stats"]
        for p in path:
            stats = stats[p]
        mean, var = (stats["mean"], stats["var"]) if running_stats else (x.mean((0, 1, 2)), x.var((0, 1, 2)))
        return (x - mean) / np.sqrt(np.asarray(var, np.float64) + 1e-5)

    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(bn(conv(np.asarray(x, np.float64), ("stem_conv",)), ("stem_bn",)))
    b = "stage0_block0"  # stride 1, identity shortcut
    y = relu(bn(conv(x, (b, "conv0")), (b, "bn0")))
    x = relu(bn(conv(y, (b, "conv1")), (b, "bn1")) + x)
    b = "stage1_block0"  # stride 2, projection shortcut
    y = relu(bn(conv(x, (b, "conv0"), 2), (b, "bn0")))
    short = bn(conv(x, (b, "shortcut_conv"), 2), (b, "shortcut_bn"))
    x = relu(bn(conv(y, (b, "conv1")), (b, "bn1")) + short)
    return x.mean((1, 2)) @ layer(("head",))


def test_resnet_evaluation_uses_the_running_batchnorm_statistics():
    """The trainer's eval path (masks folded by make_masks_fn, then make_eval_fn) on a ResNet
    whose running statistics are far from any batch's: its loss and hits are those of a float64
    eval-mode reference, example by example, whatever the rest of the batch holds."""
    import ml_collections

    from edgepopup_jax.models import get_model
    from edgepopup_jax.training import sharding

    k, n = 0.5, 6
    model = get_model("cifar_resnet18", stage_sizes=(1, 1), width=0.125, keep_fraction=k)
    r = np.random.default_rng(0)
    shapes = flax.traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32)))
    draw = {"kernel": lambda shape: r.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1])),
            "scores": lambda shape: r.uniform(-1, 1, shape),
            "mean": lambda shape: r.uniform(-1, 1, shape),
            "var": lambda shape: r.uniform(0.2, 3, shape)}  # running statistics far from a batch's
    variables = flax.traverse_util.unflatten_dict(
        {path: draw[path[-1]](a.shape).astype(np.float32) for path, a in shapes.items()})
    data = ml_collections.ConfigDict({"mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.3)})
    images = r.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = r.integers(0, 10, n).astype(np.int32)
    x = input_pipeline.normalize(images, data.mean, data.std)
    logits = _resnet_eval_reference(variables, x, k)
    ref_loss = -(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(n), labels]
    # batch statistics would give other logits: the test tells the two apart
    assert np.abs(_resnet_eval_reference(variables, x, k, running_stats=False) - logits).max() > 0.1

    mesh = sharding.make_mesh(jax.devices()[:1])
    folded = evaluation.make_masks_fn(model, mesh)(variables)
    eval_fn = evaluation.make_eval_fn(model, 10, mesh, data)

    def sums(imgs, valid):
        batch = {"image": imgs, "label": labels, "valid": np.asarray(valid, np.float32)}
        return jax.device_get(eval_fn(folded, sharding.to_global(batch, mesh)))

    full = sums(images, np.ones(n))
    np.testing.assert_allclose(full["loss"], ref_loss.sum(), rtol=1e-4)
    assert full["top1"] == np.sum(logits.argmax(1) == labels) and full["count"] == n
    # example 0's loss alone (the rest masked out), among the same, other or blank examples
    for other in (images, r.integers(0, 256, images.shape, dtype=np.uint8), np.zeros_like(images)):
        one = sums(np.concatenate([images[:1], other[1:]]), np.eye(n)[0])
        np.testing.assert_allclose(one["loss"], ref_loss[0], rtol=1e-4)


def test_resume_from_a_periodic_asynchronous_checkpoint_is_bit_identical(tmp_path, monkeypatch):
    """A run with BatchNorm, augmentation and supermask sampling dies at step 6, after its
    periodic step-4 checkpoint was saved asynchronously while step 5 trained (on the state that
    step donated). Resumed from that checkpoint, it ends bit-identical to an uninterrupted run."""
    c = small_config(**{"num_train_steps": 6, "checkpoint_every_steps": 2, "eval_every_steps": 1000,
                        "batch_size": 16, "data.augment": "cifar", "model.name": "cifar_resnet18",
                        "model.width": 0.0625, "model.stage_sizes": [1], "model.mask": "supermask",
                        "optim.learning_rate": 10.0})
    straight = loop.train_and_evaluate(c, str(tmp_path / "straight"), devices=one_device())
    real_iterator = train.input_pipeline.train_iterator

    def dies_at_step_6(*args, **kwargs):
        for step, batch in enumerate(real_iterator(*args, **kwargs), start=1):
            if step == 6:
                raise RuntimeError("simulated crash")
            yield batch

    saves, real_save = [], ckpt_lib.Checkpointer.save

    def recorded_save(self, step, *args, force=False, **kwargs):
        saves.append((step, force))
        return real_save(self, step, *args, force=force, **kwargs)

    monkeypatch.setattr(train.input_pipeline, "train_iterator", dies_at_step_6)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", recorded_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train_and_evaluate(c, str(tmp_path / "resumed"), devices=one_device())
    assert saves == [(2, False), (4, False)]  # periodic saves only, no forced one at the stop
    assert ckpt_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints")).latest_step() == 4
    monkeypatch.undo()
    rest = loop.train_and_evaluate(c, str(tmp_path / "resumed"), devices=one_device())
    assert rest["step"] == 6 and [h["step"] for h in rest["train_history"]] == list(range(1, 7))
    assert rest["state_sha256"] == straight["state_sha256"]
    np.testing.assert_array_equal(losses(rest), losses(straight))
    assert len(set(losses(straight))) == 6  # it trained: every step's loss differs
    saved = {name: json.loads((tmp_path / name / "results.json").read_text())
             for name in ("straight", "resumed")}
    for r in saved.values():
        for key in WALL_CLOCK:
            r.pop(key)
    assert saved["resumed"] == saved["straight"]  # eval and history included
