"""The batched mask selection (core/selection.py) vs the per-layer one, for ResNet-50 and WRN-50-2.

    PYTHONPATH=. python benchmarks/selection.py time [--models resnet50,wide_resnet50_2] [--reps 5]
    PYTHONPATH=. python benchmarks/selection.py compiled [--targets gpu:h100:8,tpu:v5e:2x4]

`time` (CPU, 1 device): one selection of every layer's mask, jitted, median of --reps, the
variants alternating: "per-layer bisect" is what an accelerator ran first (one 31-pass loop per
layer), "batched search" what it runs now (one loop of 8 passes for all layers, 15 candidate
thresholds per layer per pass), "batched bisect" the same loop with 1 candidate (31 passes: what
accelerators ran before, and the CPU's global scope), "per-layer radix" what the CPU runs.

`compiled` (needs the [preflight] extra): the trainer's real train step compiled for a target:
first (each layer selects its own mask), before (selection.with_masks: one batched bisection,
split over the data axis) and now (the same, 15 candidates per pass). Counts the while loops and
their trip counts (dependent passes) in the compiled program, the collectives, and the bytes the
counting passes read per device.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgepopup_jax.core import masking, selection
from edgepopup_jax.models import get_model

KEEP = 0.3
PER_LAYER_PASSES = 31 + 2  # masking's bisection, then the > t and == t counts
BATCHED_PASSES = selection.passes(selection.ACCELERATOR_CANDIDATES) + 2


def score_shapes(name):
    model = get_model(name, num_classes=1000, keep_fraction=KEEP)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    return [leaf.shape for path, leaf in leaves if str(path[-1]).endswith("'scores']")]


def time_selection(models, reps):
    variants = {
        "per-layer bisect": lambda s: [masking._topk_mask_forward(x, KEEP, "bisect") for x in s],
        "batched search": lambda s: selection.select_masks(s, KEEP, method="batched"),
        "batched bisect": lambda s: selection.select_masks(s, KEEP, method="batched", candidates=1),
        "per-layer radix": lambda s: [masking._topk_mask_forward(x, KEEP, "radix") for x in s],
    }
    print("| model | layers | scores | " + " | ".join(f"{v} s" for v in variants)
          + " | per-layer bisect / batched search |")
    print("|---" * (4 + len(variants)) + "|")
    for name in models:
        shapes = score_shapes(name)
        keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
        scores = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
        fns = {v: jax.jit(f) for v, f in variants.items()}
        outs = {v: jax.block_until_ready(f(scores)) for v, f in fns.items()}  # compile, warm up
        for v in variants:  # all exact: the same masks
            for a, b in zip(outs[v], outs["per-layer radix"]):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        times = {v: [] for v in variants}
        for _ in range(reps):
            for v, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(scores))
                times[v].append(time.perf_counter() - t)
        med = {v: float(np.median(t)) for v, t in times.items()}
        print(f"| {name} | {len(shapes)} | {sum(int(np.prod(s)) for s in shapes):,} | "
              + " | ".join(f"{med[v]:.3f}" for v in variants)
              + f" | {med['per-layer bisect'] / med['batched search']:.2f}x |", flush=True)


@contextlib.contextmanager
def per_layer_selection():
    """The trainer as it was: no masks collection, each layer selects its own mask."""
    from edgepopup_jax.core import selection
    original = selection.with_masks
    selection.with_masks = lambda variables, model, *args, **kwargs: variables
    try:
        yield
    finally:
        selection.with_masks = original


def _trip_count(line: str, hlo: str) -> int:
    """A while's trip count: XLA:GPU states it; elsewhere, the constant its condition compares to."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=(%[\w.\-]+)", line).group(1)
    body = re.search(re.escape(condition) + r" .*?\{(.*?)\n\}", hlo, re.S).group(1)
    return max(int(c) for c in re.findall(r"s32\[\][^ ]* constant\((\d+)\)", body))


def loop_stats(hlo: str):
    """(while loops, sum of their trip counts: dependent passes) in compiled HLO text."""
    loops = re.findall(r"= .*? while\(.*", hlo)
    return len(loops), sum(_trip_count(line, hlo) for line in loops)


VARIANTS = {  # label: (context, counting passes incl. the > t and == t counts, split over devices)
    "per-layer bisect (first)": (per_layer_selection, PER_LAYER_PASSES, False),
    "batched bisect (before)": (lambda: selection.accelerator_candidates(1), selection.passes(1) + 2, True),
    "batched search (now)": (contextlib.nullcontext, BATCHED_PASSES, True),
}


def compiled(models, target_specs):
    from edgepopup_jax.configs import imagenet
    from edgepopup_jax.planning import preflight, targets
    print("| model | target | selection | while loops | dependent passes | all-reduce ops (MiB) | "
          "selection reads per device | compile s |")
    print("|---" * 8 + "|")
    for name in models:
        n_scores = sum(int(np.prod(s)) for s in score_shapes(name))
        config = imagenet.get_config(name)
        for spec in target_specs:
            target = targets.parse_target(spec)
            for label, (context, passes, split) in VARIANTS.items():
                t = time.time()
                with context():
                    hlo = preflight.compile_train_step(config, target).as_text()
                loops, trips = loop_stats(hlo)
                reduce = preflight.collectives(hlo).get("all-reduce", {"count": 0, "bytes": 0})
                reads = passes * (-(-n_scores // target.num_devices) if split else n_scores) * 4
                print(f"| {name} | {spec} | {label} | {loops} | {trips} | {reduce['count']} "
                      f"({reduce['bytes'] / 2**20:.1f}) | {reads / 1e9:.2f} GB | {time.time() - t:.0f} |",
                      flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("time", "compiled"))
    parser.add_argument("--models", default="resnet50,wide_resnet50_2")
    parser.add_argument("--targets", default="gpu:h100:8,tpu:v5e:2x4")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.what == "time":
        time_selection(models, args.reps)
    else:
        jax.config.update("jax_platforms", "cpu")
        compiled(models, args.targets.split(","))


if __name__ == "__main__":
    main()
