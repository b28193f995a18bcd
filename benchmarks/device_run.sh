#!/usr/bin/env bash
# The prepared command for a lent GPU (the `device` tool): the accelerator step table, in one call.
#
# The GPU image has JAX (CUDA), flax, optax, orbax-checkpoint, etils and absl, but neither
# ml-collections nor TensorFlow. TensorFlow is too big to carry and the step table does not need
# it (--input_images 0: the input pipeline is measured on CPU, see the README). Carry
# ml-collections as a wheel. Once, here, in the repo's root:
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl "ml-collections>=1.0,<2"
#
# then call the device tool with carry [".whl"], timeout_s 600 and the command
#
#   bash benchmarks/device_run.sh
#
# Each table row is printed (and written to $OUT/accelerator.md) as soon as its model is done,
# ImageNet models first, and the benchmark is stopped after STEP_BUDGET_S seconds, so a slow
# compile still returns the rows finished by then.
set -uo pipefail
out=${OUT:-/tmp/device_run}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import ml_collections" || {
    echo "cannot import ml_collections: carry it as a wheel in .whl (see the top of this script)"
    exit 1; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, jax, flax, optax, orbax.checkpoint as ocp
print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__,
      '| optax', optax.__version__, '|', jax.devices())"
} 2>&1 | tee "$out/env.txt"

timeout "${STEP_BUDGET_S:-450}" python3 benchmarks/accelerator.py --input_images 0 \
    --models "${MODELS:-resnet50,wide_resnet50_2,conv4,cifar_resnet18}" "$@" 2>&1 \
    | tee "$out/accelerator.md"
