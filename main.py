"""Trains edge-popup (or a baseline) from a config file.

  python main.py --config=configs/cifar10_conv4.py --workdir=runs/conv4 --config.model.keep_fraction=0.3

Running again with the same --workdir resumes from its latest checkpoint.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # edgepopup_jax, also when not installed

try:
    from absl import app, flags, logging
    from ml_collections import config_flags
except ImportError as e:  # the library alone is installed
    sys.exit(f"error: the trainer needs the [train] extra ({e.name} is not installed): "
             "pip install 'edgepopup_jax[train]'")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and results.json go.")
flags.DEFINE_bool("multihost", False, "Join a multi-host job whose peers jax.distributed finds by "
                  "itself (Cloud TPU pod slices; SLURM is detected without this flag).")
flags.DEFINE_string("coordinator_address", None, "Multi-process elsewhere: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from edgepopup_jax.training import supervisor
    if (supervisor.multi_process(FLAGS.coordinator_address, FLAGS.multihost)
            and not os.environ.get(supervisor.SUPERVISED)):
        # One process of several: run as a child, so that a lost peer, which ends this process
        # from C++, is still reported in one line (training/supervisor.py).
        return supervisor.supervise(sys.argv, workdir=FLAGS.workdir, process_id=FLAGS.process_id,
                                    num_processes=FLAGS.num_processes)
    from edgepopup_jax.training import checkpoint as ckpt_lib
    from edgepopup_jax.training import loop, sharding, train, workdir_lock

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                    multihost=FLAGS.multihost)
    import jax
    import numpy as np
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    logging.info("Config:\n%s", FLAGS.config)
    try:
        results = loop.train_config(FLAGS.config, FLAGS.workdir)
    except ValueError as e:  # bad config, data or checkpoint: say what, not a traceback
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (train.TrainingDiverged, ckpt_lib.DiskFull) as e:  # the run, not the config: exit 1,
        logging.error("%s", e)                                 # the checkpoints intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    except workdir_lock.WorkdirBusy as e:  # another job trains there: nothing was touched
        print(f"error: {e}", file=sys.stderr)
        return workdir_lock.BUSY_EXIT
    if isinstance(results, list):  # config.parallel_runs seeds, one group
        for r in results:
            seed = r["seed"] if "seed" in r else r["config"]["seed"]
            print(f"seed {seed}: " + (r["message"] if r.get("status") == "diverged" else
                                      f"top-1 {r['eval']['top1']:.4f}  top-5 {r['eval']['top5']:.4f}"
                                      if r["eval"] else f"stopped at step {r['step']}"))
        top1 = [r["eval"]["top1"] for r in results if r.get("eval")]
        if top1:
            print(f"top-1 over {len(top1)} seeds: {np.mean(top1):.4f} +- {np.std(top1):.4f}  -> "
                  f"{FLAGS.workdir}/seed_*/results.json")
        return 0
    if jax.process_index() == 0 and results["eval"] is not None:
        print(f"top-1 {results['eval']['top1']:.4f}  top-5 {results['eval']['top5']:.4f}  "
              f"kept {results['weights_kept']:,} of {results['weights_total']:,} weights  "
              f"({results['step']} steps, {results['wall_time_sec']:.0f} s)  -> "
              f"{os.path.join(FLAGS.workdir, 'results.json')}")
    return 0


if __name__ == "__main__":
    from edgepopup_jax.training import command  # app.run; --help exits 0
    command.run(main, sys.modules[__name__])
