"""Throughput of the input pipelines (images/s), printed as a table.

    python benchmarks/input_pipeline.py --data_dir=/tmp/cifar10 [--batch_size=128 --num_batches=200]

--data_dir is an unzipped CIFAR-10 PNG folder (train/<class>/*.png, test/<class>/*.png), e.g.
    unzip -q ../shared/data/cifar10_png.zip -d /tmp/cifar10
Without it (or if it is missing) only mnist5k is measured.
"""

import argparse
import itertools
import os
import sys
import time

import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from edgepopup_jax.training import input_pipeline as ip  # noqa: E402


def configs(data_dir):
    out = {
        "mnist5k": dict(
            name="mnist5k", data_dir=None, augment="none", mean=(0.1307,), std=(0.3081,), shuffle_buffer=4000
        ),
    }
    if data_dir:
        out["cifar10 folder"] = dict(
            name="folder",
            data_dir=data_dir,
            augment="cifar",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            shuffle_buffer=50_000,
        )
    return {
        k: ml_collections.ConfigDict(
            dict(train_split="train", eval_split="test", image_size=32, cache=True, **v)
        )
        for k, v in out.items()
    }


def measure(it, batch_size, warmup, num_batches):
    t0 = time.perf_counter()
    for _ in itertools.islice(it, warmup):
        pass
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(1 for _ in itertools.islice(it, num_batches))
    return n * batch_size / (time.perf_counter() - t0), n, first


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="unzipped CIFAR-10 PNG folder")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if args.data_dir and not os.path.isdir(os.path.join(args.data_dir, "train")):
        print(
            f"{args.data_dir} has no train/ folder; unzip CIFAR-10 first, e.g.\n"
            f"    unzip -q ../shared/data/cifar10_png.zip -d {args.data_dir}\n"
            "Measuring mnist5k only.\n"
        )
        args.data_dir = None
    elif not args.data_dir:
        print("No --data_dir: measuring mnist5k only (see --help for CIFAR-10).\n")

    rows = []
    for name, cfg in configs(args.data_dir).items():
        # Train: the first (warm-up) batches include reading/decoding into the cache and filling the shuffle buffer.
        # The timed batches read the in-memory cache.
        it = ip.train_iterator(cfg, batch_size=args.batch_size, seed=0, process_index=0, process_count=1)
        rate, n, first = measure(it, args.batch_size, args.warmup, args.num_batches)
        rows.append((name, f"train (augment={cfg.augment}, cache)", n, first, rate))
        # Eval: whole passes over the split (each pass decodes again and pays its start-up), until
        # num_batches batches are done; "warm-up s" is the time to the first batch of the first pass.
        n, t0, first = 0, time.perf_counter(), None
        while n < args.num_batches:
            for _ in ip.eval_iterator(cfg, batch_size=args.batch_size, process_index=0, process_count=1):
                first = first or time.perf_counter() - t0
                n += 1
        rate = n * args.batch_size / (time.perf_counter() - t0)
        rows.append((name, "eval", n, first, rate))

    print(f"batch_size={args.batch_size}, warm-up {args.warmup} batches, cpu cores={os.cpu_count()}")
    header = ("dataset", "pipeline", "timed batches", "warm-up s", "images/s")
    print(f"| {header[0]:<15} | {header[1]:<30} | {header[2]:>13} | {header[3]:>9} | {header[4]:>9} |")
    print(f"|{'-' * 17}|{'-' * 32}|{'-' * 15}|{'-' * 11}|{'-' * 11}|")
    for dataset, pipeline, n, first, rate in rows:
        print(f"| {dataset:<15} | {pipeline:<30} | {n:>13} | {first:>9.2f} | {rate:>9,.0f} |")


if __name__ == "__main__":
    main()
