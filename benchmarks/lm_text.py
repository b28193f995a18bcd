"""The zoo's transformer_lm (a plain Flax decoder-only Transformer made edge-popup by the
transform) on text that ships with the repository (its docs/*.md, bytes), against its dense
baseline (mask="dense": the same module, every weight learned) on the same budget and seed.
Your own loop: ep.train_step. Prints a markdown row per model: held-out loss and perplexity
(per byte).

    PYTHONPATH=. .venv/bin/python benchmarks/lm_text.py --steps 300
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import edgepopup_jax as ep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def corpus() -> np.ndarray:
    text = b"\n".join(p.read_bytes() for p in sorted((ROOT / "docs").glob("*.md")))
    return np.frombuffer(text, np.uint8).astype(np.int32)


def batches(data, seq: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, data.size - seq - 1, batch)
        window = np.stack([data[s:s + seq + 1] for s in start])
        yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def run(mask: str, args, train, test) -> dict:
    model = ep.models.get_model("transformer_lm", mask=mask, keep_fraction=args.keep_fraction,
                                weight_init="signed_constant", scale_by_keep_fraction=True,
                                dim=args.dim, depth=args.depth, heads=4, mlp_dim=4 * args.dim,
                                max_len=args.seq)
    x, _ = next(batches(train, args.seq, args.batch, 0))
    variables = jax.jit(model.init)(jax.random.key(args.seed), x)
    lr = args.lr if mask == "edge_popup" else args.dense_lr
    tx = optax.adamw(optax.cosine_decay_schedule(lr, args.steps), weight_decay=0.0)

    def loss(logits, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    step = jax.jit(ep.train_step(model, tx, loss))
    evaluate = jax.jit(lambda v, x, y: loss(model.apply(v, x), x, y))
    opt_state = tx.init(variables["params"])
    start = time.time()
    for _, (x, y) in zip(range(args.steps), batches(train, args.seq, args.batch, args.seed)):
        variables, opt_state, value, _ = step(variables, opt_state, x, y)
    jax.block_until_ready(variables)
    seconds = time.time() - start
    held_out = [float(evaluate(variables, x, y)) for _, (x, y) in
                zip(range(args.eval_batches), batches(test, args.seq, args.batch, 1))]
    value = float(np.mean(held_out))
    return {"loss": value, "ppl": math.exp(value), "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--keep_fraction", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.1, help="Adam on the scores")
    p.add_argument("--dense_lr", type=float, default=3e-3, help="Adam on the dense baseline's weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_batches", type=int, default=20)
    args = p.parse_args()
    data = corpus()
    split = int(0.9 * data.size)
    train, test = data[:split], data[split:]
    print(f"{data.size:,} bytes of docs/*.md (90% train, 10% held out); {args.steps} steps of "
          f"{args.batch} x {args.seq} bytes; dim {args.dim}, depth {args.depth}; {jax.devices()[0]}")
    print("| model | held-out loss (nats/byte) | perplexity | train s |\n|---|---:|---:|---:|")
    for mask in ("edge_popup", "dense"):
        r = run(mask, args, train, test)
        print(f"| transformer_lm {mask} | {r['loss']:.3f} | {r['ppl']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
