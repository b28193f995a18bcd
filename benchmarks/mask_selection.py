"""Time of the exact top-k mask (masking.topk_mask_forward) vs the full-sort reference, on the
default backend: one tensor of 1M / 10M / 69M scores, and the 54 per-layer score tensors of
Wide ResNet-50-2 (68,814,016 scores) masked in one jitted call.

    PYTHONPATH=. python benchmarks/mask_selection.py [--sizes 1e6,1e7,68814016] [--reps 5]
        [--skip_sort_above 2e7] [--no_wrn]

Columns: "fast" is topk_mask_forward (radix select on CPU, bisection elsewhere), "bisect" the
31-pass counting bisection (the method used on GPU/TPU, timed here on the same backend), "sort"
topk_mask_reference. All jitted, timed after a warm-up; median of --reps runs, the methods
alternating within each row so that background load hits them alike.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgepopup_jax.core import masking
from edgepopup_jax.models import get_model

KEEP = 0.5


def score_shapes_wrn50_2():
    model = get_model("wide_resnet50_2", num_classes=1000, keep_fraction=KEEP)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    return [leaf.shape for path, leaf in leaves if str(path[-1]).endswith("'scores']")]


def make_scores(shapes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return [jax.random.uniform(k, s, jnp.float32, -1.0, 1.0) for k, s in zip(keys, shapes)]


def masks_fn(method):
    if method == "fast":
        one = lambda s: masking.topk_mask_forward(s, KEEP)  # noqa: E731
    elif method == "bisect":
        one = lambda s: masking._topk_mask_forward(s, KEEP, "bisect")  # noqa: E731
    else:
        one = lambda s: masking.topk_mask_reference(s, KEEP)  # noqa: E731
    return jax.jit(lambda scores: [one(s) for s in scores])


def time_once(f, x):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    return time.perf_counter() - t0


def bench_row(shapes, methods, reps):
    scores = make_scores(shapes)
    fns = {m: masks_fn(m) for m in methods}
    for m, f in fns.items():  # compile + warm-up; the fast masks must equal the reference
        out = f(scores)
        jax.block_until_ready(out)
        if m != "sort" and "sort" in fns:
            ref = fns["sort"](scores)
            assert all(bool(jnp.array_equal(a, b)) for a, b in zip(out, ref)), m
    times = {m: [] for m in methods}
    for _ in range(reps):
        for m, f in fns.items():
            times[m].append(time_once(f, scores))
    return {m: float(np.median(t)) for m, t in times.items()}


def fmt(t):
    return "skipped" if t is None else f"{t:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e6,1e7,68814016", help="single-tensor sizes, comma separated")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip_sort_above", type=float, default=2e7,
                   help="skip the sort reference for rows with more scores than this")
    p.add_argument("--skip_bisect_above", type=float, default=float("inf"))
    p.add_argument("--no_wrn", action="store_true", help="skip the per-layer WRN-50-2 row")
    args = p.parse_args()

    rows = [(f"1 tensor of {int(float(s)):,}", [(int(float(s)),)]) for s in args.sizes.split(",") if s]
    if not args.no_wrn:
        shapes = score_shapes_wrn50_2()
        rows.append((f"WRN-50-2, {len(shapes)} layers", shapes))

    print(f"backend: {jax.default_backend()}, keep_fraction {KEEP}, median of {args.reps} "
          f"(seconds per call, all layers of a row in one jitted call)\n")
    print("| scores | fast s | bisect s | sort s | sort / fast | bisect / fast |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, shapes in rows:
        n = sum(int(np.prod(s)) for s in shapes)
        methods = ["fast"]
        if n <= args.skip_bisect_above:
            methods.append("bisect")
        if n <= args.skip_sort_above:
            methods.append("sort")
        t = bench_row(shapes, methods, args.reps)
        fast, bis, srt = t["fast"], t.get("bisect"), t.get("sort")
        ratio = lambda a: "-" if a is None else f"{a / fast:.1f}x"  # noqa: E731
        print(f"| {name} | {fmt(fast)} | {fmt(bis)} | {fmt(srt)} | {ratio(srt)} | {ratio(bis)} |",
              flush=True)


if __name__ == "__main__":
    main()
