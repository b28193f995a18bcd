"""Seconds per jitted SGD training step, edge-popup vs the dense baseline (learned weights).

    PYTHONPATH=. python benchmarks/train_step.py [--models conv4,cifar_resnet18] [--rounds 10]
        [--batch 128] [--keep_fraction 0.5]

One step: forward (train=True; ResNets update batch_stats), softmax cross-entropy on random
32x32x3 inputs and labels, backward, SGD with momentum 0.9 over variables['params'] only (the
scores for edge-popup, kernels and BN scale/bias for dense). As in the trainer, the updated state
is donated and the frozen weights are an input only (returning them from an undonated step would
copy them every step, an overhead the trainer does not pay). Each round times one step of every (model, mode) in turn, so background load hits all
alike; the table gives the median over rounds and the ratio edge-popup / dense.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import edgepopup_jax as ep

MODES = ("dense", "edge_popup")


def make_step(model_name, mode, batch, keep_fraction, seed=0):
    model = ep.get_model(model_name, keep_fraction=keep_fraction, mask=mode)
    kx, ky, kinit = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    variables = model.init(kinit, x[:1], train=False)
    params = variables["params"]
    frozen = variables.get("frozen", {})  # an input only, as in the trainer: never copied out
    carried = {k: v for k, v in variables.items() if k not in ("params", "frozen")}
    mutable = ["batch_stats"] if "batch_stats" in carried else False
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, carried):
        out = model.apply({"params": params, "frozen": frozen, **carried}, x, train=True,
                          mutable=mutable)
        logits, updates = out if mutable else (out, {})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, carried):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carried)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, {**carried, **updates}, loss

    state = [params, opt_state, carried]

    def run():
        t0 = time.perf_counter()
        out = step(*state)
        jax.block_until_ready(out)
        state[:] = out[:3]
        return time.perf_counter() - t0

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="conv4,cifar_resnet18")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--keep_fraction", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per (model, mode) first")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]

    runs = {(m, mode): make_step(m, mode, args.batch, args.keep_fraction) for m in models for mode in MODES}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            times[key].append(run())

    print(f"backend: {jax.default_backend()}, batch {args.batch}, keep_fraction {args.keep_fraction}, "
          f"median of {args.rounds} alternating rounds\n")
    print("| model | dense s | edge-popup s | ratio |")
    print("| --- | --- | --- | --- |")
    for m in models:
        d = float(np.median(times[(m, "dense")]))
        e = float(np.median(times[(m, "edge_popup")]))
        print(f"| {m} | {d:.3f} | {e:.3f} | {e / d:.3f} |")


if __name__ == "__main__":
    main()
