"""Conv4 edge-popup (k = 0.5) on the real CIFAR-10 for a few epochs on this machine.

Prints the input pipeline's images/s alone, training images/s, and test accuracy per epoch.

  python benchmarks/cifar10_conv4.py --data_dir=/tmp/cifar10_png --epochs=2
  (unzip first: unzip -q ../shared/data/cifar10_png.zip -d /tmp/cifar10_png)
"""
import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edgepopup_jax.configs import cifar10  # noqa: E402
from absl import logging  # noqa: E402

from edgepopup_jax.training import input_pipeline, train  # noqa: E402
from edgepopup_jax.training import loop


def find_data_dir(data_dir: str) -> str:
    root = pathlib.Path(data_dir)
    for candidate in (root, *root.glob("*")):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return str(candidate)
    raise SystemExit(f"no CIFAR-10 folder (train/ and test/) under {data_dir}; unzip it first:\n"
                     f"  unzip -q ../shared/data/cifar10_png.zip -d {data_dir}")


def pipeline_images_per_sec(config, batches: int = 100) -> float:
    it = input_pipeline.train_iterator(config.data, batch_size=config.batch_size, seed=0)
    for _ in range(10):  # warm-up: decode and cache fill the shuffle buffer
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.batch_size / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/tmp/cifar10_png")
    parser.add_argument("--workdir", default="/tmp/runs/bench_cifar10_conv4")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--keep_fraction", type=float, default=0.5)
    args = parser.parse_args()

    config = cifar10.get_config("conv4")
    config.data.name = "folder"
    config.data.data_dir = find_data_dir(args.data_dir)
    config.model.keep_fraction = args.keep_fraction
    config.num_epochs = args.epochs
    config.log_every_steps = 50

    logging.set_verbosity(logging.INFO)  # the trainer's progress lines
    pipeline = pipeline_images_per_sec(config)
    results = loop.train_and_evaluate(config, args.workdir)
    print(f"\nConv4 edge-popup k={args.keep_fraction} on CIFAR-10 ({config.data.data_dir}), "
          f"batch {config.batch_size}, {results['num_devices']} device(s), "
          f"{results['wall_time_sec']:.0f} s wall\n")
    print("| input pipeline alone, images/s | training, images/s | ratio |")
    print("|---|---|---|")
    train_ips = results["images_per_sec"]
    print(f"| {pipeline:,.0f} | {train_ips:,.1f} | {pipeline / train_ips:.0f}x |\n")
    print("| epoch | step | test top-1 | test top-5 |")
    print("|---|---|---|---|")
    for e in results["eval_history"]:
        print(f"| {e['epoch']:.2f} | {e['step']} | {100 * e['top1']:.2f}% | {100 * e['top5']:.2f}% |")


if __name__ == "__main__":
    main()
