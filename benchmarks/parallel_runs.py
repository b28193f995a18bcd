"""Runs one after another (today's sweep, tf.data) vs many runs in one program (device data).

  PYTHONPATH=. .venv/bin/python benchmarks/parallel_runs.py grid [--epochs 20] [--groups 11,33]
      the README's FC/MNIST-5k grid (k x init x 3 seeds + 3 dense baselines = 33 runs): the
      sweep as it trains today vs --parallel_runs=R; wall time, speed-up, mean top-1
  PYTHONPATH=. .venv/bin/python benchmarks/parallel_runs.py conv --data_dir=/tmp/cifar [--steps 30]
      Conv2 on the real CIFAR-10 (an image folder): per-run images/s alone (tf.data; device
      data) vs in a group of 4 (device data); --model, --groups 4,30, --dtype bfloat16; without
      --data_dir, random pixels of CIFAR's shape (a GPU with nothing carried)

Each variant trains in a new temporary workdir in this one process, one after the other, so
background load hits them alike only roughly: compare the ratios within one run.
"""
import argparse
import functools
import importlib.util
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from edgepopup_jax.configs import cifar10, default  # noqa: E402
from edgepopup_jax.training import parallel, train  # noqa: E402
from edgepopup_jax.training import loop
from edgepopup_jax.planning import grid as grid_lib  # noqa: E402
from edgepopup_jax.planning import sweep  # noqa: E402


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {jax.devices()[0].platform} x {jax.device_count()}"


def mnist_grid(epochs: float):
    base = default.get_config()
    base.num_epochs = epochs
    base.log_every_steps = 1000
    base.lock()
    g = sweep.make_grid(base, ["model.keep_fraction=0.1,0.3,0.5,0.7,0.9",
                               "model.weight_init=kaiming_normal,signed_constant"], "0,1,2", None,
                        ["model.mask=dense", "optim.learning_rate=0.01"], [])
    return base, g


def grid_benchmark(args):
    base, g = mnist_grid(args.epochs)
    n = len(grid_lib.expand(g))
    rows = []
    quiet = lambda line: None  # noqa: E731
    variants = [("one run after another (today's sweep, tf.data)", None)]
    variants += [(f"--parallel_runs={r} (device data)", r) for r in args.groups]
    for name, r in variants:
        with tempfile.TemporaryDirectory() as workdir:
            t = time.perf_counter()
            if r is None:
                results = sweep.run_sweep(base, g, workdir, say=quiet,
                                          train_fn=functools.partial(loop.train_and_evaluate,
                                                                     devices=jax.devices()[:1]))
            else:
                results = sweep.run_sweep_parallel(
                    base, g, workdir, parallel_runs=r, say=quiet,
                    train_group=lambda c, d, say: loop.train_group(c, d, devices=jax.devices()[:1]))
            seconds = time.perf_counter() - t
        top1 = np.mean([row["top1"] for row in results if row["status"] == "ok"])
        rows.append((name, len(results), seconds, top1))
        print(f"  {name}: {seconds:.0f} s", flush=True)
    print(f"\nFC (LeNet-300-100) on MNIST-5k, {n} runs of {args.epochs:g} epochs "
          f"({int(args.epochs * 62)} steps of batch 64); {machine()}\n")
    print("| how | runs | wall s | speed-up | mean top-1 |\n| --- | ---: | ---: | ---: | ---: |")
    for name, count, seconds, top1 in rows:
        print(f"| {name} | {count} | {seconds:.0f} | {rows[0][2] / seconds:.2f}x | {top1:.4f} |")


def _synthetic_cifar(path: str) -> str:
    """A CIFAR-10-shaped .npz of random pixels (for timing only: no download, no carry)."""
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 256, (50_000, 32, 32, 3), np.uint8),
             train_labels=rng.integers(0, 10, 50_000), test_images=rng.integers(
                 0, 256, (10_000, 32, 32, 3), np.uint8), test_labels=rng.integers(0, 10, 10_000))
    return path


def conv_benchmark(args):
    c = cifar10.get_config(args.model)
    c.num_train_steps = args.steps
    c.log_every_steps = max(args.steps // 3, 1)
    c.eval_every_steps = c.checkpoint_every_steps = 10**9  # eval and save once, at the end
    c.eval_batch_size = 1000
    c.model.compute_dtype = args.dtype
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        if args.data_dir:
            c.data.name, c.data.data_dir = "folder", args.data_dir
        else:
            c.data.name, c.data.data_dir = "npz", _synthetic_cifar(os.path.join(workdir, "c.npz"))
        cache = os.path.join(workdir, "cache")
        if args.data_dir and importlib.util.find_spec("tensorflow") is not None:
            tf_config = grid_lib.with_overrides(c, {"data.pipeline": "tf_data"})
            solo = loop.train_and_evaluate(tf_config, os.path.join(workdir, "tf"),
                                            devices=jax.devices()[:1])
            rows.append(("alone, tf.data", 1, solo["images_per_sec"]))
        device = grid_lib.with_overrides(c, {"data.pipeline": "device"})
        for r in (1, *args.groups):
            configs = [grid_lib.with_overrides(device, {"seed": s}) for s in range(r)]
            results = loop.train_group(configs, [os.path.join(workdir, f"g{r}", str(s))
                                                     for s in range(r)],
                                           devices=jax.devices()[:1], cache_dir=cache)
            rows.append((f"{'alone' if r == 1 else f'in a group of {r}'}, device data", r,
                         results[0]["images_per_sec"]))
            print(f"  group of {r}: {results[0]['images_per_sec']:.0f} images/s per run", flush=True)
    data = "CIFAR-10 (image folder)" if args.data_dir else "random CIFAR-shaped pixels"
    print(f"\n{args.model} on {data}, batch {c.batch_size}, {args.dtype}, {args.steps} steps "
          f"(images/s: median of the log intervals after the first); {machine()}\n")
    base = rows[0][2]
    print("| how | runs | images/s per run | images/s in all | per run vs first row | in all vs first row |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r, rate in rows:
        print(f"| {name} | {r} | {rate:.0f} | {rate * r:.0f} | {rate / base:.2f}x | {rate * r / base:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid", help="the FC/MNIST-5k grid: sweep vs --parallel_runs")
    g.add_argument("--epochs", type=float, default=20.0)
    g.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[11, 33])
    c = sub.add_parser("conv", help="a conv net on CIFAR-10: per-run images/s alone vs in groups")
    c.add_argument("--model", default="conv2")
    c.add_argument("--data_dir", default=None, help="the unzipped CIFAR-10 folder (train/, "
                   "test/); default: random pixels of its shape")
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[4])
    c.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    grid_benchmark(args) if args.what == "grid" else conv_benchmark(args)


if __name__ == "__main__":
    main()
