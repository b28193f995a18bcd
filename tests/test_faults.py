"""Faults an unattended run meets: a corrupt latest checkpoint, a full disk. Nothing is lost,
and the user reads one line saying what happened and how to go on."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.training import checkpoint as ckpt_lib  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.training import train  # noqa: E402
from tests.test_train import dir_digest, one_device, small_config  # noqa: E402


def corrupt(step_dir: pathlib.Path) -> None:
    """Truncates every large file of a checkpoint's state to half (array data lost)."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_on_corrupt_is_checked():
    with pytest.raises(ValueError, match="checkpoint.on_corrupt 'skip'; allowed: fall_back, refuse"):
        loop.train_and_evaluate(small_config(**{"checkpoint.on_corrupt": "skip"}), "/nonexistent",
                                 devices=one_device())


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_bit_exactly(tmp_path):
    config = small_config(num_train_steps=6, checkpoint_every_steps=2)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), devices=one_device())
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir), devices=one_device(), stop_after_steps=4)
    corrupt(workdir / "checkpoints" / "4")
    resumed = loop.train_and_evaluate(config, str(workdir), devices=one_device())
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert resumed["corrupt_checkpoint"] == {"corrupt_step": 4, "corrupt_steps": [4], "resumed_from": 2}
    assert (workdir / "checkpoints" / "4.corrupt" / "state").is_dir()  # moved aside, not deleted
    assert [h["step"] for h in resumed["train_history"]] == [1, 2, 3, 4, 5, 6]


def test_every_checkpoint_corrupt_starts_over_and_keeps_them(tmp_path):
    config = small_config(num_train_steps=4, checkpoint_every_steps=2)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), devices=one_device())
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir), devices=one_device(), stop_after_steps=3)
    for step in (2, 3):
        corrupt(workdir / "checkpoints" / str(step))
    again = loop.train_and_evaluate(config, str(workdir), devices=one_device())
    assert again["state_sha256"] == straight["state_sha256"]
    assert again["corrupt_checkpoint"] == {"corrupt_step": 3, "corrupt_steps": [3, 2], "resumed_from": None}
    assert {p.name for p in (workdir / "checkpoints").iterdir()} >= {"2.corrupt", "3.corrupt"}


def test_a_checkpoint_of_another_shape_is_never_taken_for_corrupt(tmp_path):
    """Arrays of other shapes under the same identity (a model changed in the code, say) are
    refused, not moved aside: falling back would throw away every checkpoint of the run."""
    config = small_config(num_train_steps=4, checkpoint_every_steps=2)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, str(workdir), devices=one_device())
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
    state, _ = checkpointer.restore_raw()
    template = jax.tree.map(lambda x: jax.numpy.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
                            if x.ndim else x, state)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        checkpointer.restore_intact(template, {}, on_corrupt="fall_back")
    assert not isinstance(e.value, ckpt_lib.CorruptCheckpoint)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    checkpointer.close()


def _main(workdir, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--config=configs/default.py",
                           f"--workdir={workdir}", "--config.num_train_steps=30",
                           "--config.checkpoint_every_steps=10", "--config.log_every_steps=10",
                           "--config.eval_every_steps=30", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_falls_back_from_a_corrupt_checkpoint_or_refuses_it(tmp_path):
    """The default (device data) path through main.py, as an unattended restart meets it."""
    first = _main(tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    finished = json.loads((tmp_path / "a" / "results.json").read_text())
    corrupt(tmp_path / "a" / "checkpoints" / "30")
    before = dir_digest(tmp_path / "a" / "checkpoints")

    refused = _main(tmp_path / "a", "--config.checkpoint.on_corrupt=refuse")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "error: checkpoint 30 in" in refused.stderr
    assert dir_digest(tmp_path / "a" / "checkpoints") == before

    again = _main(tmp_path / "a")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Moved it aside to" in again.stderr and "30.corrupt" in again.stderr
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["corrupt_checkpoint"] == {"corrupt_step": 30, "corrupt_steps": [30], "resumed_from": 20}
    assert results["state_sha256"] == finished["state_sha256"]
    assert results["eval"] == finished["eval"]


def test_a_full_disk_says_so_keeps_the_good_checkpoints_and_cleans_up_at_the_next_start(
        tmp_path, monkeypatch):
    """A patched writer (works anywhere; the tmpfs test below is the real thing where root may
    mount one): the save of step 4 fails for want of space, after leaving its temporary dir."""
    import errno

    import orbax.checkpoint as ocp
    config = small_config(num_train_steps=6, checkpoint_every_steps=2)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"), devices=one_device())
    workdir = tmp_path / "run"
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            (pathlib.Path(self.directory) / "4.orbax-checkpoint-tmp-1234").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(ckpt_lib.DiskFull) as e:
        loop.train_and_evaluate(config, str(workdir), devices=one_device())
    assert str(e.value).startswith(f"the disk is full: checkpoint 4 could not be written to "
                                   f"{workdir / 'checkpoints'}. The latest good checkpoint is step 2")
    assert "run the same command again to resume from step 2" in str(e.value)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    again = loop.train_and_evaluate(config, str(workdir), devices=one_device())
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    assert again["state_sha256"] == straight["state_sha256"]


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only; skips elsewhere): room for two of the default model's
    checkpoints (1.6 MiB each) and not a third."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_cli_on_a_full_disk_exits_with_one_line_and_resumes_on_a_bigger_one(tmp_path, small_disk):
    straight = _main(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    workdir = small_disk / "run"
    full = _main(workdir)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "RESOURCE_EXHAUSTED" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the disk is full: checkpoint 30 could not be written to "
                      f"{workdir / 'checkpoints'}. The latest good checkpoint is step 20, intact; "
                      "free space (or move the workdir to a disk with room), then run the same "
                      "command again to resume from step 20"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == \
        ["10", "20", "30.orbax-checkpoint-tmp"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = _main(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left by a checkpoint save that did not finish" in again.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20", "30"]
    assert json.loads((workdir / "results.json").read_text())["state_sha256"] == \
        json.loads((tmp_path / "straight" / "results.json").read_text())["state_sha256"]
