"""Evaluates a subnet file or a training checkpoint on a config's eval split.

  python -m edgepopup_jax.subnet.evaluate --subnet=conv4.subnet --config=configs/cifar10_conv4.py
  python -m edgepopup_jax.subnet.evaluate --workdir=runs/conv4 --config=configs/cifar10_conv4.py

Prints a per-layer table of kept weights and top-1 / top-5 over the whole eval split, computed
by the trainer's own eval step (so the numbers are the ones the trainer reported).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program, so importing this module defines no flags
    config_flags.DEFINE_config_file("config", None, "Config file whose `data` section names the dataset.")
    flags.DEFINE_string("subnet", None, "A .subnet file (from export or interop).")
    flags.DEFINE_string("workdir", None, "Or: a training run's workdir (its latest checkpoint).")


def load(subnet_path: str | None = None, workdir: str | None = None):
    """(model, variables, per-layer stats) from a subnet file or a training workdir."""
    from edgepopup_jax.core import summary
    from edgepopup_jax.models import get_model
    from edgepopup_jax.subnet import export
    from edgepopup_jax.subnet import io as subnet

    if (subnet_path is None) == (workdir is None):
        raise ValueError("give exactly one of --subnet and --workdir")
    if subnet_path is not None:
        model, variables = subnet.load_subnet(subnet_path)
        if not hasattr(model, "keep_fractions"):
            # A transformed zoo model's file (vit, transformer_lm) loads as the plain Flax module,
            # its kernels W * mask: evaluated as the transform's dense form, which applies it as
            # it is (its variables all in params, no mask to select).
            from edgepopup_jax.core import transform
            model = transform.edge_popup(model, mask="dense")
        sf = subnet.read_subnet(subnet_path)
        rows = [summary.LayerStats("/".join(e.path), e.shape, e.total,
                                   e.kept if e.kind == "masked" else e.total,
                                   sf.mask if e.kind == "masked" else "dense") for e in sf.layers]
        return model, variables, rows
    name, options, variables, _ = export.training_variables(workdir)
    model = get_model(name, **options)  # checks the options
    return model, variables, summary.layer_stats(variables, model.keep_fractions(variables["params"]),
                                                 model.mask, mask_scope=model.mask_scope)


def evaluate(config, subnet_path: str | None = None, workdir: str | None = None, devices=None):
    """Returns ({top1, top5, loss, count}, per-layer stats)."""
    import jax

    from edgepopup_jax.training import evaluation, input_pipeline, sharding

    info = input_pipeline.get_info(config.data)
    model, variables, rows = load(subnet_path, workdir)
    if model.num_classes != info.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes but {config.data.name} has "
                         f"{info.num_classes}")
    mesh = sharding.make_mesh(devices)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    eval_fn = evaluation.make_eval_fn(model, info.num_classes, mesh, config.data)
    metrics = evaluation.evaluate(variables, eval_fn, config, mesh,
                                  evaluation.make_masks_fn(model, mesh))
    return metrics, rows


def main(argv):
    del argv
    from edgepopup_jax.core import summary

    if FLAGS.config is None:
        raise app.UsageError("--config is required (its data section names the eval split)")
    try:
        metrics, rows = evaluate(FLAGS.config, FLAGS.subnet, FLAGS.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format_table(rows))
    print(f"\n{FLAGS.config.data.name}:{FLAGS.config.data.eval_split}  top-1 {metrics['top1']:.4f}  "
          f"top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  ({metrics['count']} examples)")
    return 0


def cli():
    """`python -m edgepopup_jax.subnet.evaluate` and the `edgepopup-evaluate` console script."""
    from edgepopup_jax.training import command
    _define_flags()
    command.run(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()
