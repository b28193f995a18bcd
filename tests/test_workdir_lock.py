"""One writer per workdir (training/workdir_lock.py) and no orphaned worker (supervisor.py)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import loop
from edgepopup_jax.training import supervisor, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from edgepopup_jax.training import workdir_lock as w; "
        "[w.acquire(d) for d in sys.argv[1:]]; print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder():
    """Starts a process that locks the given workdirs and sleeps; kills it at the end."""
    procs = []

    def start(*workdirs):
        p = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, workdirs)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(tmp_path, holder):
    workdir = tmp_path / "run"
    first = holder(workdir)
    with pytest.raises(workdir_lock.WorkdirBusy) as e:
        workdir_lock.acquire(workdir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{workdir} is in use by another training: pid {first.pid} on host "
                              f"{socket.gethostname()}, started ")
    assert message.endswith("One job per workdir: wait for it to end or stop it, or give this run "
                            "another --workdir")
    assert not workdir_lock.holds(workdir)
    first.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops its flock
    first.wait()
    with workdir_lock.hold(workdir):
        assert workdir_lock.holds(workdir / "checkpoints")
        assert json.loads((workdir / ".lock.process0").read_text())["pid"] == os.getpid()
    assert not workdir_lock.holds(workdir)
    assert (workdir / ".lock.process0").exists()  # not created by us: the lock file stays


def test_a_refused_run_in_a_new_directory_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with workdir_lock.hold(tmp_path / "new" / "run"):
            raise ValueError("a bad config")
    assert list(tmp_path.iterdir()) == []
    with workdir_lock.hold(tmp_path / "kept"):
        (tmp_path / "kept" / "results.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".lock.process0", "results.json"]


def test_hold_takes_all_or_none_and_releases_on_an_error(tmp_path, holder):
    holder(tmp_path / "b")
    with pytest.raises(workdir_lock.WorkdirBusy, match="b is in use"):
        with workdir_lock.hold(tmp_path / "a", tmp_path / "b"):
            pass
    assert not workdir_lock.holds(tmp_path / "a")  # a was released when b was refused
    with pytest.raises(RuntimeError):
        with workdir_lock.hold(tmp_path / "a"):
            raise RuntimeError
    with workdir_lock.hold(tmp_path / "a"):
        with pytest.raises(workdir_lock.WorkdirBusy, match="already being trained by this process"):
            workdir_lock.acquire(tmp_path / "a")


def test_the_processes_of_one_job_share_a_workdir(tmp_path, monkeypatch, holder):
    holder(tmp_path / "run")  # process 0 of a job
    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
    with workdir_lock.hold(tmp_path / "run"):  # its process 1: another file
        assert (tmp_path / "run" / ".lock.process1").exists()


def test_a_workdir_that_cannot_be_locked_falls_back_to_this_hosts_lock(tmp_path, monkeypatch,
                                                                         holder, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    holder("gs://bucket/run")
    with pytest.raises(workdir_lock.WorkdirBusy, match="^gs://bucket/run is in use by another"):
        workdir_lock.acquire("gs://bucket/run")
    assert "refuses a second job on this host only" in caplog.text
    assert len(list((tmp_path / "cache" / "edgepopup_jax" / "locks").iterdir())) == 1


def test_leftover_saves_are_removed_only_by_the_lock_holder(tmp_path, holder):
    checkpoints = tmp_path / "run" / "checkpoints"
    leftover = checkpoints / "40.orbax-checkpoint-tmp-1234"
    leftover.mkdir(parents=True)
    ckpt_lib.Checkpointer(str(checkpoints)).close()  # a reader (export, evaluate): no lock
    assert leftover.is_dir()
    live = holder(tmp_path / "run")  # a live writer: its save in flight is left alone
    assert leftover.is_dir()
    live.kill()
    live.wait()
    with workdir_lock.hold(tmp_path / "run"):
        ckpt_lib.Checkpointer(str(checkpoints)).close()
    assert not leftover.exists()


def test_a_supervised_worker_dies_with_its_supervisor():
    """The worker is SIGKILLed by the kernel when its supervisor is (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = ("import os, subprocess, sys, time; from edgepopup_jax.training import supervisor; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            "preexec_fn=supervisor.die_with(os.getpid())); print(c.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and alive(child):
        time.sleep(0.05)
    assert not alive(child)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, not yet reaped
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------
# through main.py, as a user in a second terminal and a scheduler meet it

def _main(workdir, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config=configs/default.py",
                             f"--workdir={workdir}", "--config.num_train_steps=30",
                             "--config.checkpoint_every_steps=10", "--config.log_every_steps=10",
                             "--config.eval_every_steps=30", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_cli_a_second_launch_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path):
    solo = _main(tmp_path / "solo")
    first = _main(tmp_path / "run")
    lock = tmp_path / "run" / ".lock.process0"
    deadline = time.time() + 240
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    code, err = _finish(_main(tmp_path / "run"))
    assert code == workdir_lock.BUSY_EXIT and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {tmp_path / 'run'} is in use by another training: pid {first.pid} on host "), err
    assert _finish(first)[0] == 0
    assert _finish(solo)[0] == 0
    result = lambda name: json.loads((tmp_path / name / "results.json").read_text())  # noqa: E731
    assert result("run")["state_sha256"] == result("solo")["state_sha256"]

    killed = _main(tmp_path / "killed")  # SIGKILLed after its first checkpoint
    while not (tmp_path / "killed" / "checkpoints" / "10").is_dir() and time.time() < deadline:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        time.sleep(0.1)
    killed.kill()
    killed.communicate()
    code, err = _finish(_main(tmp_path / "killed"))
    assert code == 0, err[-3000:]
    assert "Resumed from step 10" in err or "Resumed from step 20" in err, err[-3000:]
    assert result("killed")["state_sha256"] == result("solo")["state_sha256"]


def _watch(text: str):
    import io
    out = io.StringIO()
    watch = supervisor._Watch(io.StringIO(text), out)
    watch.read()
    return out.getvalue(), "".join(watch.held), watch.trouble


TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    f()\n'


def test_the_supervisor_holds_a_traceback_that_ends_in_a_lost_peer():
    shown, held, trouble = _watch("step 30\n" + TRACEBACK + "RuntimeError: Gloo allgather failed: "
                                  "Connection closed by peer\n")
    assert (shown, trouble) == ("step 30\n", True) and held.startswith("Traceback")
    # a traceback cut short by the process's death (the peer's sign comes after it)
    shown, held, trouble = _watch("step 30\n" + TRACEBACK + "E heartbeat timeout\n")
    assert (shown, trouble) == ("step 30\n", True) and held.startswith("Traceback")


def test_the_supervisor_shows_any_other_traceback_at_once():
    text = "step 30\n" + TRACEBACK + "ValueError: bad\nstep 31\n"
    assert _watch(text) == (text, "", False)


def test_a_group_refuses_when_any_of_its_runs_is_held_and_touches_none(tmp_path, holder):
    from edgepopup_jax.configs import default
    from edgepopup_jax.training import parallel

    config = default.get_config()
    config.parallel_runs = 3
    configs, workdirs = parallel.seed_workdirs(config, str(tmp_path))
    holder(workdirs[1])
    with pytest.raises(workdir_lock.WorkdirBusy, match="seed_1 is in use by another training"):
        loop.train_group(configs, workdirs)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "seed_1", "seed_1/.lock.process0"]  # the holder's; seed_0, locked first, left no trace
    assert not any(workdir_lock.holds(w) for w in workdirs)
