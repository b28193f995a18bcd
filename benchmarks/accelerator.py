"""One command for a GPU/TPU host: the trainer's real step, edge-popup vs dense, in bf16.

    PYTHONPATH=. python benchmarks/accelerator.py [--models conv4,cifar_resnet18,resnet50,wide_resnet50_2]
        [--rounds 20] [--batch_scale 1.0] [--input_images 2000] [--dtype bfloat16]
        [--state_sharding replicated|fsdp]

For each model, at the paper's global batch (CIFAR nets 128, ImageNet nets 256; --batch_scale
multiplies it) over all local devices, with the trainer's own jitted step (step.make_steps,
a group of one: same shardings, donation, batched mask selection):
  * images/s of the dense baseline and of edge-popup, alternating step by step in one run;
  * the mask selection's share of the edge-popup step (the step's selection alone, jitted, timed
    in the same rounds);
  * the same two for edge-popup with the 31-pass batched bisection that the 8-pass search
    replaced (selection.ACCELERATOR_CANDIDATES = 1), old vs new in the same rounds (on a CPU
    both run the per-layer radix select);
and then the ImageNet input pipeline's images/s (train and eval transforms) on a folder of
generated 500x375 JPEGs. Works on CPU too (small --batch_scale) as a smoke test.

The step tables need only JAX, flax, optax, orbax-checkpoint and ml-collections, not TensorFlow
(GPU images often lack it): pass --input_images 0 there. benchmarks/device_run.sh is the
prepared command for a lent GPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from edgepopup_jax.core import selection
from edgepopup_jax.training import input_pipeline, parallel, sharding
from edgepopup_jax.training import step as step_lib

CIFAR = {"conv4", "cifar_resnet18"}
MODELS = ("conv4", "cifar_resnet18", "resnet50", "wide_resnet50_2")
INPUT_BATCH = 128


def _config(name: str, mode: str, batch: int, dtype: str, state_sharding: str):
    from edgepopup_jax.configs import cifar10, imagenet
    c = cifar10.get_config(name) if name in CIFAR else imagenet.get_config(name)
    c.model.mask = mode
    c.model.compute_dtype = dtype
    c.batch_size = batch
    c.state_sharding = state_sharding
    return c


def _runner(name: str, mode: str, batch: int, mesh, dtype: str, state_sharding: str):
    c = _config(name, mode, batch, dtype, state_sharding)
    size, classes = (32, 10) if name in CIFAR else (224, 1000)
    info = input_pipeline.DatasetInfo(classes, (size, size, 3), batch * 100, 1000)
    init, train_step = step_lib.run_of_one(c, info, mesh.devices.flat)
    state = [init(c.seed)]
    rng = np.random.default_rng(0)
    local = sharding.local_batch_size(batch, mesh)
    batch_data = sharding.to_global({
        "image": rng.integers(0, 256, (local, size, size, 3), np.uint8),
        "label": rng.integers(0, classes, local).astype(np.int32)}, mesh)
    group = parallel.make_group([c], info)  # the step's own selection, from its kept counts
    scope = group.scopes[0]
    masks = jax.jit(lambda params: selection.edge_popup_masks_for_counts(
        params, group.hyper["counts"][scope][0], scope))

    def step():
        t = time.perf_counter()
        state[0], metrics = train_step(state[0], batch_data)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    def select_masks():
        t = time.perf_counter()
        jax.block_until_ready(masks(state[0].params))
        return time.perf_counter() - t

    return step, select_masks


def bench_steps(models, rounds, batch_scale, dtype, state_sharding="replicated"):
    mesh = sharding.make_mesh()
    print(f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind}; {dtype}; state "
          f"{state_sharding}; median of {rounds} alternating rounds; edge-popup's selection: "
          f"the search ({selection.ACCELERATOR_CANDIDATES} candidates per pass, now) and the "
          f"bisection (before)\n")
    print("| model | global batch | dense img/s | edge-popup img/s | edge-popup / dense step | "
          "selection share of the edge-popup step | with the bisection: edge-popup / dense | "
          "bisection share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        batch = max(mesh.devices.size, int((128 if name in CIFAR else 256) * batch_scale)
                    // mesh.devices.size * mesh.devices.size)
        run = {"dense": _runner(name, "dense", batch, mesh, dtype, state_sharding)[0]}
        run["popup"], run["select"] = _runner(name, "edge_popup", batch, mesh, dtype, state_sharding)
        before = _runner(name, "edge_popup", batch, mesh, dtype, state_sharding)
        # The 31-pass bisection the search replaced: the first call traces and compiles with
        # it, later calls reuse that.
        with selection.accelerator_candidates(1):
            for f in before:
                f()
        run["popup_before"], run["select_before"] = before
        for f in list(run.values()) * 2:  # compile, warm up
            f()
        times = {k: [] for k in run}
        for _ in range(rounds):
            for k, f in run.items():
                times[k].append(f())
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"| {name} | {batch} | {batch / med['dense']:,.0f} | {batch / med['popup']:,.0f} | "
              f"{med['popup'] / med['dense']:.3f} | {med['select'] / med['popup']:.1%} | "
              f"{med['popup_before'] / med['dense']:.3f} | "
              f"{med['select_before'] / med['popup_before']:.1%} |", flush=True)


def bench_input(num_images: int, batch: int = INPUT_BATCH):
    import tensorflow as tf
    from edgepopup_jax.configs import imagenet
    root = tempfile.mkdtemp(prefix="jpegs_")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for i in range(num_images if split == "train" else num_images // 2):
            d = os.path.join(root, split, f"class{i % 10}")
            os.makedirs(d, exist_ok=True)
            pixels = rng.integers(0, 256, (375, 500, 3), np.uint8)
            tf.io.write_file(os.path.join(d, f"{i}.jpg"), tf.io.encode_jpeg(pixels, quality=90))
    c = imagenet.get_config("resnet50").data
    c.name, c.data_dir, c.shuffle_buffer = "folder", root, 1024
    print(f"\nImageNet-style input ({os.cpu_count()} CPU cores, 500x375 JPEGs, batch {batch}):\n")
    print("| transform | images/s | images/s per core |")
    print("|---|---:|---:|")
    train_batches = max(num_images // batch - 1, 1)
    fused = input_pipeline._decode_random_resized_crop

    def decode_whole(raw, seed, size, channels):  # the transform before decode_and_crop_jpeg
        return input_pipeline._random_resized_crop(input_pipeline._decode_image(raw, channels), seed, size)

    rates = {}
    for label in ("train, decode whole then crop", "train, decode only the crop", "eval"):
        input_pipeline._decode_random_resized_crop = decode_whole if "whole" in label else fused
        try:
            if label.startswith("train"):  # one warm-up batch, then a timed epoch's worth
                it = input_pipeline.train_iterator(c, batch)
                next(it)
                t, n = time.perf_counter(), 0
                for _ in range(train_batches):
                    n += len(next(it)["label"])
            else:  # the whole split once, counting real (unpadded) images
                t, n = time.perf_counter(), 0
                for b in input_pipeline.eval_iterator(c, batch, 0, 1):
                    n += int(b["valid"].sum())
        finally:
            input_pipeline._decode_random_resized_crop = fused
        rates[label] = n / (time.perf_counter() - t)
        print(f"| {label} | {rates[label]:,.0f} | {rates[label] / os.cpu_count():,.0f} |", flush=True)


def _tensorflow_installed() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch_scale", type=float, default=1.0)
    p.add_argument("--input_images", type=int, default=2000, help="0 skips the input benchmark")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 for the CPU table)")
    p.add_argument("--state_sharding", default="replicated", choices=sharding.STATE_SHARDINGS)
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        p.error(f"--models: unknown {sorted(set(models) - set(MODELS)) or 'empty list'}; allowed: "
                f"{', '.join(MODELS)}")
    if 0 < args.input_images < 2 * INPUT_BATCH:
        p.error(f"--input_images must be 0 (skip) or >= {2 * INPUT_BATCH} (a warm-up batch and a "
                f"timed one of {INPUT_BATCH}), got {args.input_images}")
    if args.input_images and not _tensorflow_installed():
        p.error("--input_images needs TensorFlow (pip install -e .[train]); pass --input_images 0 "
                "to time the steps only")
    bench_steps(models, args.rounds, args.batch_scale, args.dtype, args.state_sharding)
    if args.input_images:
        bench_input(args.input_images)


if __name__ == "__main__":
    main()
