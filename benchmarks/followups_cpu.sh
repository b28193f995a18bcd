#!/usr/bin/env bash
# docs/results/followups_cpu.{md,csv,png}: EP vs its follow-up methods at short CPU budgets.
# FC on MNIST-5k (3 seeds, 18 runs as 4 groups: ~4 min on 2 cores) and Conv2 on the real
# CIFAR-10 (1 epoch, 1 seed, 6 runs one after another: ~40 min on 2 shared cores).
# Usage, from the repository root: bash benchmarks/followups_cpu.sh [CIFAR_SEEDS, default 0]
set -euo pipefail
PY=".venv/bin/python"
export JAX_PLATFORMS=cpu PYTHONPATH=.
NPZ=${NPZ:-/tmp/cifar10.npz}
[ -f "$NPZ" ] || nice -n 10 $PY benchmarks/followups_cpu.py npz --zip=../shared/data/cifar10_png.zip --out="$NPZ"
nice -n 10 $PY benchmarks/followups_cpu.py mnist --workdir=runs/followups_mnist
nice -n 10 $PY benchmarks/followups_cpu.py cifar --workdir=runs/followups_cifar --npz="$NPZ" --seeds="${1:-0}"
$PY benchmarks/followups_cpu.py report --mnist=runs/followups_mnist --cifar=runs/followups_cifar \
    --out=docs/results/followups_cpu
