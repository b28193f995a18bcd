"""The transform's overhead: a training step of FC and Conv4 written with plain nn.Dense /
nn.Conv and made edge-popup by ep.edge_popup, against the hand-written models (models/conv.py),
side by side in one run (alternating rounds, median per variant, the same variables).

    PYTHONPATH=. .venv/bin/python benchmarks/transform_overhead.py --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import edgepopup_jax as ep
from edgepopup_jax.core import selection


class PlainConvNet(nn.Module):
    """models.ConvNet with plain layers, the same layer names."""

    convs: tuple = (64, 64, "M", 128, 128, "M")
    dense: tuple = (256, 256)

    @nn.compact
    def __call__(self, x):
        n = 0
        for f in self.convs:
            if f == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.relu(nn.Conv(f, (3, 3), use_bias=False, name=f"conv{n}")(x))
            n += 1
        x = x.reshape((x.shape[0], -1))
        for i, f in enumerate(self.dense):
            x = nn.relu(nn.Dense(f, use_bias=False, name=f"fc{i}")(x))
        return nn.Dense(10, use_bias=False, name="head")(x)


def step_fn(model, tx):
    def step(variables, opt_state, x, y):
        def loss(params):
            v = selection.with_masks({**variables, "params": params}, model)
            logits = model.apply(v, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        value, grads = jax.value_and_grad(loss)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state, value
    return jax.jit(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    cases = {
        "fc": (ep.models.get_model("fc"), PlainConvNet(convs=(), dense=(300, 100)), (28, 28, 1)),
        "conv4": (ep.models.get_model("conv4"), PlainConvNet(), (32, 32, 3)),
    }
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, {args.rounds} rounds of "
          f"{args.steps} steps, median ms per step")
    print("| model | hand-written | transformed | ratio |\n|---|---:|---:|---:|")
    for name, (hand, plain, shape) in cases.items():
        transformed = ep.edge_popup(plain, keep_fraction=hand.keep_fraction)
        x = jax.random.normal(jax.random.key(1), (args.batch,) + shape)
        y = jnp.zeros((args.batch,), jnp.int32)
        variables = jax.jit(hand.init)(jax.random.key(0), x[:1])
        tx = optax.sgd(0.1, momentum=0.9)
        runs = {k: step_fn(m, tx) for k, m in (("hand", hand), ("plain", transformed))}
        state = {k: (variables, tx.init(variables["params"])) for k in runs}
        for k, f in runs.items():  # compile, warm up
            jax.block_until_ready(f(*state[k], x, y))
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, f in runs.items():
                v, o = state[k]
                start = time.perf_counter()
                for _ in range(args.steps):
                    v, o, _ = f(v, o, x, y)
                jax.block_until_ready(v)
                times[k].append((time.perf_counter() - start) / args.steps * 1e3)
                state[k] = (v, o)
        h, t = statistics.median(times["hand"]), statistics.median(times["plain"])
        print(f"| {name} | {h:.2f} | {t:.2f} | {t / h:.3f} |")


if __name__ == "__main__":
    main()
