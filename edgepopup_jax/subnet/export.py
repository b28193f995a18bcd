"""Exports the subnetwork found by a training run as a compact .subnet file.

  python -m edgepopup_jax.subnet.export --workdir=runs/conv4 --out=conv4.subnet [--step=N]
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from edgepopup_jax.training import checkpoint as ckpt_lib
from edgepopup_jax.training import command, train
from edgepopup_jax.subnet import io as subnet

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program, so importing this module defines no flags
    flags.DEFINE_string("workdir", None, "The training run's --workdir (its checkpoints/ are read).")
    flags.DEFINE_string("out", None, "The .subnet file to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")


def training_variables(workdir: str, step: int | None = None):
    """(model_name, model_options, variables, meta) of a training checkpoint in workdir."""
    state, meta = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                        async_save=False).restore_raw(step)
    options = train.model_options(meta["model"])
    name = options.pop("name")
    scheduled = meta.get("keep_fraction")  # saved during a sparsity schedule: that step's k
    if scheduled is not None and scheduled != options["keep_fraction"]:
        per_layer = [f for f in ("first_last_keep_fraction", "linear_keep_fraction")
                     if options.get(f) is not None]
        if per_layer:
            raise ValueError(f"this checkpoint was saved while model.keep_fraction_anneal_epochs "
                             f"was still annealing, with model.{per_layer[0]} set: export one "
                             "saved after the annealing")
        options["keep_fraction"] = scheduled
    options["num_classes"] = meta["num_classes"]
    variables = {k: state[k] for k in ("params", "frozen", "batch_stats") if state.get(k)}
    return name, options, variables, meta


def export(workdir: str, out: str, step: int | None = None) -> dict:
    name, options, variables, _ = training_variables(workdir, step)
    return subnet.save_subnet(out, model_name=name, model_options=options, variables=variables)


def main(argv):
    del argv
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    try:
        stats = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {FLAGS.out}: " + ", ".join(f"{k}={v}" for k, v in stats.items()
                                             if isinstance(v, (int, float, str)) and k != "path"))
    return 0


def cli():
    """`python -m edgepopup_jax.subnet.export` and the `edgepopup-export` console script."""
    _define_flags()
    command.run(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()
