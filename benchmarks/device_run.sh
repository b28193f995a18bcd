#!/usr/bin/env bash
# The prepared commands for a lent GPU (the `device` tool).
#
# The GPU image has JAX (CUDA), flax, optax, orbax-checkpoint, etils, absl, matplotlib and
# tensorboard, but neither ml-collections nor TensorFlow, and it cannot download. Carry
# ml-collections as a wheel. Once, here, in the repo's root (.whl/ and .carry/ are gitignored):
#
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl "ml-collections>=1.0,<2"
#
# 1. The accelerator step table, one call: carry [".whl"], timeout_s 600,
#      bash benchmarks/device_run.sh
#    Each row is printed (and written to $OUT/accelerator.md) as soon as its model is done,
#    ImageNet models first, and it stops after STEP_BUDGET_S seconds, so a slow compile still
#    returns the rows finished by then.
#
# 2. A group's step against a run's alone, one call: carry [".whl"], timeout_s 600,
#      bash benchmarks/device_run.sh groups
#    Conv4 in bf16 on random CIFAR-shaped pixels (nothing to carry): per-run and total images/s
#    alone and in groups of 4 and 30 (GROUPS), written to $OUT/groups.md. On XLA:CPU a group's
#    convolutions (vmap: one grouped convolution) cost 3.7x R separate ones; this is where a GPU
#    says what they cost there.
#
# 3. The paper's Fig. 3 Conv4 panel at its full recipe (100 epochs; k in {0.3, 0.5, 0.7} x
#    {signed constant, kaiming normal} x 5 seeds = 30 runs) in one group, on the real CIFAR-10.
#    One call carries at most 64 MiB, CIFAR-10 is 161 MiB as a compressed .npz: split it here first,
#      .venv/bin/python benchmarks/cifar_carry.py split --zip ../shared/data/cifar10_png.zip
#    (-> .carry/cifar10/0, 1, 2), then call, each within 30 s of the last (the machine stays
#    warm that long, and /tmp with it):
#      carry [".whl", ".carry/cifar10/0"]  bash benchmarks/device_run.sh cifar_part 0
#      carry [".carry/cifar10/1"]          bash benchmarks/device_run.sh cifar_part 1
#      carry [".carry/cifar10/2"]          bash benchmarks/device_run.sh cifar_part 2
#      carry []                            bash benchmarks/device_run.sh fig3     (timeout_s 600)
#    fig3 joins the parts (checking every sha256), then trains the group with the sweep
#    (--parallel_runs=30, data.pipeline=device, bf16; a checkpoint every 10 epochs, since each
#    is 30 orbax saves, and at the stop) in /tmp/fig3. It stops itself after
#    FIG3_BUDGET_S (540) seconds with every run's checkpoint saved (SIGTERM), so calling fig3
#    again on the warm machine resumes; $OUT gets the sweep's log, results.csv and sweep.png
#    (the finished runs) and progress.txt (the group's latest step and top-1 per run).
#    FIG3_ARGS adds sweep flags (e.g. --config.num_epochs=1 for a short check).
set -uo pipefail
out=${OUT:-/tmp/device_run}
mkdir -p "$out"
export PYTHONPATH=.:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
carry_dir=${CARRY_DIR:-.carry/cifar10}  # where the parts come in (the carried folders)
carried=${CARRIED_DIR:-/tmp/edgepopup_carry}  # where they are gathered, call after call
npz=${CIFAR_NPZ:-/tmp/cifar10.npz}

install_wheels() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
    fi
    python3 -c "import ml_collections" || {
        echo "cannot import ml_collections: carry it as a wheel in .whl (see the top of this script)"
        exit 1; }
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, jax, flax, optax, orbax.checkpoint as ocp
print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__,
      '| optax', optax.__version__, '|', jax.devices())"
}

case "${1:-steps}" in
steps)
    install_wheels
    environment 2>&1 | tee "$out/env.txt"
    timeout "${STEP_BUDGET_S:-450}" python3 benchmarks/accelerator.py --input_images 0 \
        --models "${MODELS:-resnet50,wide_resnet50_2,conv4,cifar_resnet18}" "${@:2}" 2>&1 \
        | tee "$out/accelerator.md"
    ;;
groups)
    install_wheels
    environment 2>&1 | tee "$out/env.txt"
    timeout "${STEP_BUDGET_S:-450}" python3 benchmarks/parallel_runs.py conv --model conv4 \
        --dtype bfloat16 --steps "${STEPS:-90}" --groups "${GROUPS:-4,30}" 2>&1 | tee "$out/groups.md"
    ;;
cifar_part)
    part=${2:?usage: device_run.sh cifar_part N}
    [ -d "$carry_dir/$part" ] || { echo "carry $carry_dir/$part with this call"; exit 1; }
    if compgen -G ".whl/*.whl" > /dev/null; then install_wheels; fi
    mkdir -p "$carried" && cp "$carry_dir/$part"/* "$carried"/
    ls -l "$carried" | tee "$out/carried.txt"
    ;;
fig3)
    install_wheels
    environment 2>&1 | tee "$out/env.txt"
    [ -f "$npz" ] || python3 benchmarks/cifar_carry.py join --parts "$carried" --out "$npz" || exit 1
    # shellcheck disable=SC2086
    timeout -s TERM "${FIG3_BUDGET_S:-540}" python3 -m edgepopup_jax.planning.sweep \
        --config=configs/cifar10.py:conv4 --workdir="${FIG3_WORKDIR:-/tmp/fig3}" \
        --config.data.name=npz --config.data.data_dir="$npz" \
        --config.data.pipeline=device --config.model.compute_dtype=bfloat16 \
        --config.checkpoint_every_steps=3900 \
        --sweep=model.keep_fraction=0.3,0.5,0.7 \
        --sweep=model.weight_init=signed_constant,kaiming_normal --seeds=0,1,2,3,4 \
        --parallel_runs=30 --verbose ${FIG3_ARGS:-} 2>&1 | tee -a "$out/fig3.log"
    status=${PIPESTATUS[0]}
    workdir=${FIG3_WORKDIR:-/tmp/fig3}
    cp "$workdir"/results.csv "$workdir"/sweep.png "$out"/ 2>/dev/null
    python3 - "$workdir" > "$out/progress.txt" <<'EOF'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1], "runs").glob("*")):
    if (run / "results.json").exists():  # finished, or stopped with its results written
        r = json.loads((run / "results.json").read_text())
        print(run.name, "step", r["step"], "of", r["total_steps"], "top-1", (r["eval"] or {}).get("top1"))
        continue
    meta = sorted((run / "checkpoints").glob("[0-9]*/meta/metadata"), key=lambda p: int(p.parts[-3]))
    if not meta:
        print(run.name, "no checkpoint"); continue
    evals = json.loads(meta[-1].read_text()).get("history", {}).get("eval") or [{}]
    print(run.name, "step", meta[-1].parts[-3], "last top-1", evals[-1].get("top1"))
EOF
    cat "$out/progress.txt"
    exit "$status"
    ;;
*)
    echo "usage: device_run.sh [steps | groups | cifar_part N | fig3]"; exit 2 ;;
esac
