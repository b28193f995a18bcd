"""Two processes x 2 CPU devices (jax.distributed + gloo) train exactly as one process on 4 devices.

Each of the two processes (tests/multihost_worker.py) feeds its own shard of the data, so the
reference is one process on a 4-device mesh fed the SAME global batches: process 0's local batch
followed by process 1's, the row order jax.make_array_from_process_local_data gives.
"""
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.training import input_pipeline, loop, sources  # noqa: E402
from test_workdir_lock import alive  # noqa: E402

_spec = importlib.util.spec_from_file_location("multihost_worker", ROOT / "tests" / "multihost_worker.py")
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
worker_config = _worker.worker_config

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 6
TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(tmp_path, steps=STEPS, stop_after=None, tag="", state_sharding="replicated",
                   pipeline="tf_data"):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
           "JAX_PLATFORMS": "cpu", "MULTIHOST_STEPS": str(steps), "TF_CPP_MIN_LOG_LEVEL": "2",
           "MULTIHOST_STATE_SHARDING": state_sharding, "MULTIHOST_PIPELINE": pipeline}
    if stop_after is not None:
        env["MULTIHOST_STOP_AFTER"] = str(stop_after)
    address = f"127.0.0.1:{free_port()}"
    procs, outs, logs = [], [], []
    for i in range(NUM_PROCESSES):
        out, log = tmp_path / f"out{tag}{i}.json", open(tmp_path / f"log{tag}{i}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), address, str(NUM_PROCESSES),
             str(i), str(tmp_path / "workdir"), str(out)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(out)
        logs.append(log)
    return procs, outs, logs


def wait_workers(procs, logs, tmp_path, tag=""):
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        tails = "\n".join(f"--- process {i} (exit {c}):\n"
                          + (tmp_path / f"log{tag}{i}.txt").read_text()[-3000:] for i, c in enumerate(codes))
        pytest.fail(f"workers failed or timed out after {TIMEOUT_S} s: {codes}\n{tails}")


def single_process_reference_losses(config, devices, workdir):
    """Losses of one process on a `devices` mesh fed the 2-process run's global batches (the
    trainer's own loop, from an iterator source of those batches)."""
    info = input_pipeline.get_info(config.data)
    local = config.batch_size // NUM_PROCESSES

    def global_batches(start):
        iters = [input_pipeline.train_iterator(config.data, batch_size=local, seed=config.seed,
                                               start_step=start, process_index=i,
                                               process_count=NUM_PROCESSES)
                 for i in range(NUM_PROCESSES)]
        while True:
            parts = [next(it) for it in iters]
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    source = sources.IteratorSource(info, global_batches, lambda: input_pipeline.eval_iterator(
        config.data, batch_size=config.eval_batch_size, process_index=0, process_count=1))
    result = loop.train_and_evaluate(config, str(workdir), devices=devices, source=source)
    return np.array([h["loss"] for h in result["train_history"]]), result["frozen_sha256"]


def test_two_processes_match_one_process_replicated_then_fsdp(tmp_path):
    """2 processes x 2 devices, each feeding its own shard, train as one process on 4 devices fed
    the same global batches. Steps 1-3 run with the replicated state and stop (a checkpoint);
    steps 4-6 resume it with state_sharding="fsdp", where fc0's arrays are split over all 4
    devices and no process holds them whole (its checkpoint is then written from both processes'
    shards). One run covers both placements across processes and a checkpoint moving between them."""
    config = worker_config()
    config.num_train_steps = STEPS
    procs, outs, logs = launch_workers(tmp_path, stop_after=3, tag="a")
    try:  # the reference runs here while the workers start up
        devices = jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]
        reference, frozen_sha = single_process_reference_losses(config, devices, tmp_path / "reference")
    finally:
        wait_workers(procs, logs, tmp_path, tag="a")
    first = [json.loads(out.read_text()) for out in outs]
    assert [r["step"] for r in first] == [3, 3] and all(r["preempted"] for r in first)
    # The first step is bit-for-bit the same computation up to the all-reduce order.
    np.testing.assert_allclose(first[0]["train_history"][0]["loss"], reference[0], rtol=1e-6)

    procs, outs, logs = launch_workers(tmp_path, tag="b", state_sharding="fsdp")
    wait_workers(procs, logs, tmp_path, tag="b")
    results = [json.loads(out.read_text()) for out in outs]
    for i, r in enumerate(results):
        assert r["process_index"] == i and r["local_devices"] == DEVICES_PER_PROCESS
        assert r["num_processes"] == NUM_PROCESSES
        assert r["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert r["step"] == STEPS and not r["preempted"] and r["data_order_changed"] is None
        assert [h["step"] for h in r["train_history"]] == list(range(1, STEPS + 1))
        assert r["eval"]["count"] == 1000, r["eval"]
        assert r["weights_kept"] == 133_100 and r["weights_total"] == 266_200
        assert r["frozen_sha256"] == frozen_sha  # same seed -> bit-identical random weights
    # Both processes report the same losses, state and eval.
    assert results[0]["train_history"] == results[1]["train_history"]
    assert results[0]["state_sha256"] == results[1]["state_sha256"]
    assert results[0]["eval"] == results[1]["eval"]

    losses = np.array([h["loss"] for h in results[0]["train_history"]])
    assert np.all(np.isfinite(losses))
    # Later steps: float reassociation (gloo all-reduce vs in-process) can flip near-threshold
    # mask entries, so agreement is to float tolerance, not bit for bit.
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    assert (tmp_path / "workdir" / "results.json").exists()  # written by process 0 only
    saved = json.loads((tmp_path / "workdir" / "results.json").read_text())
    assert saved["num_processes"] == NUM_PROCESSES and saved["eval"]["count"] == 1000


def test_the_device_source_across_processes_survives_sigkill_and_evaluates_every_example_once(
        tmp_path):
    """2 processes x 2 devices train from the device source (each holds the data set; each run's
    batch is gathered on the devices, so the batches do not depend on the process count), are
    SIGKILLed once the step-3 checkpoint exists, relaunch, resume and finish as one process on
    4 devices does."""
    import time
    config = worker_config()
    config.num_train_steps, config.data.pipeline, config.checkpoint_every_steps = STEPS, "device", 3
    env_steps = dict(steps=STEPS, pipeline="device")
    os.environ["MULTIHOST_CHECKPOINT_EVERY"] = "3"
    try:
        procs, outs, logs = launch_workers(tmp_path, tag="a", **env_steps)
        devices = jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]
        reference = loop.train_and_evaluate(config, str(tmp_path / "reference"), devices=devices)
        deadline = time.time() + TIMEOUT_S
        while not (tmp_path / "workdir" / "checkpoints" / "3").is_dir() and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
            time.sleep(0.1)
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        for log in logs:
            log.close()
        procs, outs, logs = launch_workers(tmp_path, tag="b", **env_steps)
        wait_workers(procs, logs, tmp_path, tag="b")
    finally:
        os.environ.pop("MULTIHOST_CHECKPOINT_EVERY", None)
    results = [json.loads(out.read_text()) for out in outs]
    for r in results:
        assert r["resumed_from"] == 3
        assert r["pipeline"] == "device" and r["num_processes"] == NUM_PROCESSES
        assert r["step"] == STEPS and r["eval"]["count"] == 1000
        assert r["frozen_sha256"] == reference["frozen_sha256"]
        assert r["data_order_changed"] is None
    assert results[0]["state_sha256"] == results[1]["state_sha256"]
    np.testing.assert_allclose([h["loss"] for h in results[0]["train_history"]],
                               [h["loss"] for h in reference["train_history"]], rtol=1e-4)
    assert abs(results[0]["eval"]["top1"] - reference["eval"]["top1"]) <= 0.002


def test_resume_across_process_counts_says_the_data_order_changed(tmp_path):
    """1 process -> 2 processes (stopped) -> 1 process, one workdir.

    Each process shuffles its own shard, so the batches after a change of process count differ;
    the run must go on from the exact saved step and say so in results.json, and the checkpoint
    meta records the process count. (Same count on resume, no change reported: the test above.)
    """
    from edgepopup_jax.training import checkpoint as ckpt_lib

    config = worker_config()
    config.num_train_steps = 6
    workdir = tmp_path / "workdir"
    devices = jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]
    first = loop.train_and_evaluate(config, str(workdir), devices=devices, stop_after_steps=2)
    assert first["step"] == 2 and first["data_order_changed"] is None

    procs, outs, logs = launch_workers(tmp_path, steps=6, stop_after=2)
    wait_workers(procs, logs, tmp_path)
    r = [json.loads(out.read_text()) for out in outs]
    assert [x["step"] for x in r] == [4] * NUM_PROCESSES
    assert all(x["preempted"] for x in r)
    assert [h["step"] for h in r[0]["train_history"]] == [1, 2, 3, 4]
    assert r[0]["state_sha256"] == r[1]["state_sha256"]
    assert r[0]["data_order_changed"] == {"step": 2, "process_count_before": 1,
                                          "process_count_now": 2}
    meta = ckpt_lib.Checkpointer(str(workdir / "checkpoints")).restore_raw()[1]
    assert meta["process_count"] == 2

    last = loop.train_and_evaluate(config, str(workdir), devices=devices)
    assert last["step"] == 6 and not last["preempted"]
    assert [h["step"] for h in last["train_history"]] == list(range(1, 7))
    assert last["data_order_changed"] == {"step": 4, "process_count_before": 2,
                                          "process_count_now": 1}
    assert last["eval"]["count"] == 1000
    assert np.all(np.isfinite([h["loss"] for h in last["train_history"]]))
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["data_order_changed"]["process_count_before"] == 2


def _launch_main(tmp_path, tag: str, address: str):
    """Both processes of a 2 x 2-device job through main.py, each in its own session (so a
    test can kill one whole, as a lost host would be)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = []
    for i in range(NUM_PROCESSES):
        log = open(tmp_path / f"main{tag}{i}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--config=configs/default.py",
             f"--workdir={tmp_path / 'workdir'}", "--config.num_train_steps=60",
             "--config.checkpoint_every_steps=10", "--config.log_every_steps=5",
             "--config.eval_every_steps=1000", f"--coordinator_address={address}",
             f"--num_processes={NUM_PROCESSES}", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    return procs


def test_a_lost_process_ends_the_other_with_one_line_and_the_relaunch_resumes(tmp_path):
    import signal
    import time

    procs = _launch_main(tmp_path, "a", f"127.0.0.1:{free_port()}")
    checkpoints = tmp_path / "workdir" / "checkpoints"
    deadline = time.time() + TIMEOUT_S
    while not (checkpoints / "20").is_dir() and time.time() < deadline:
        assert all(p.poll() is None for p, _ in procs), (tmp_path / "maina0.txt").read_text()[-3000:]
        time.sleep(0.2)
    # Process 1's supervisor is SIGKILLed alone (the OOM killer, a scheduler signalling the main
    # PID): its worker must not train on as an orphan, it dies with it (PR_SET_PDEATHSIG).
    supervisor_pid = procs[1][0].pid
    worker = int(pathlib.Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text())
    os.kill(supervisor_pid, signal.SIGKILL)
    killed = time.time()
    while time.time() - killed < 10 and alive(worker):
        time.sleep(0.05)
    print(f"process 1's worker was gone {time.time() - killed:.2f} s after its supervisor")
    assert not alive(worker)
    try:
        code = procs[0][0].wait(timeout=90)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            log.close()
    out = (tmp_path / "maina0.txt").read_text()
    print(f"process 0 exited {time.time() - killed:.1f} s after process 1 was killed")
    assert time.time() - killed < 90
    assert code == 3, out[-3000:]
    assert "Traceback" not in out and "Fatal" not in out and "Check failure" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert errors == [f"error: lost a peer: process 1 stopped answering, so process 0 of 2 stopped; "
                      f"the latest checkpoint is step {step} in {checkpoints}. Relaunch the same "
                      "command on every host to resume from it"], out[-3000:]

    relaunched = _launch_main(tmp_path, "b", f"127.0.0.1:{free_port()}")
    try:
        locks = [tmp_path / "workdir" / f".lock.process{i}" for i in range(NUM_PROCESSES)]
        while not all(f.exists() and f.read_text() for f in locks) and time.time() < deadline:
            time.sleep(0.2)
        # A second job on the same workdir, while the relaunch trains: each process is refused.
        second = _launch_main(tmp_path, "c", f"127.0.0.1:{free_port()}")
        assert [p.wait(timeout=TIMEOUT_S) for p, _ in second] == [75, 75]
        for i, (_, log) in enumerate(second):
            log.close()
            out = (tmp_path / f"mainc{i}.txt").read_text()
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and " is in use by another training: pid " in errors[0], out[-3000:]
        codes = [p.wait(timeout=TIMEOUT_S) for p, _ in relaunched]
    finally:
        for p, log in relaunched:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            log.close()
    assert codes == [0, 0], (tmp_path / "mainb0.txt").read_text()[-3000:]
    results = json.loads((tmp_path / "workdir" / "results.json").read_text())
    assert results["step"] == 60 and results["eval"]["count"] == 1000
    assert results["num_processes"] == 2
