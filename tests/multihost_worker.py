"""One process of a 2-process CPU job, launched by tests/test_multihost.py.

  python tests/multihost_worker.py <coordinator host:port> <num_processes> <process_id> <workdir> <out.json>

Joins the job (gloo CPU collectives), trains the embedded default config for a few steps with
loop.train_and_evaluate and writes this process's results (train history, eval, hashes) to out.json.
The parent sets XLA_FLAGS (devices per process), the step count, MULTIHOST_STATE_SHARDING,
MULTIHOST_PIPELINE and,
to stop early as a preemption would, MULTIHOST_STOP_AFTER via the environment.
"""
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402


def worker_config():
    """The config both the workers and the single-process reference in the test use."""
    from edgepopup_jax.configs import default

    c = default.get_config()
    c.num_train_steps = int(os.environ.get("MULTIHOST_STEPS", "6"))
    c.log_every_steps = 1
    c.eval_every_steps = 1000
    c.batch_size = 32
    c.eval_batch_size = 200
    c.optim.learning_rate = 0.01
    c.state_sharding = os.environ.get("MULTIHOST_STATE_SHARDING", "replicated")
    c.data.pipeline = os.environ.get("MULTIHOST_PIPELINE", "tf_data")
    c.checkpoint_every_steps = int(os.environ.get("MULTIHOST_CHECKPOINT_EVERY", "1000"))
    return c


def main(argv):
    address, num_processes, process_id, workdir, out = argv[1:]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=120)
    from edgepopup_jax.training import loop

    stop_after = os.environ.get("MULTIHOST_STOP_AFTER")
    results = loop.train_and_evaluate(worker_config(), workdir,
                                       stop_after_steps=int(stop_after) if stop_after else None)
    keep = ("step", "eval", "train_history", "state_sha256", "frozen_sha256", "num_devices",
            "num_processes", "weights_kept", "weights_total", "preempted", "data_order_changed",
            "pipeline", "resumed_from")
    record = {k: results[k] for k in keep}
    record.update(process_index=jax.process_index(), local_devices=jax.local_device_count())
    with open(out + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(out + ".tmp", out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
