"""The train step compiled with the state replicated vs split (state_sharding="fsdp"), deviceless.

    PYTHONPATH=. python benchmarks/state_sharding.py [--models wide_resnet50_2] [--targets gpu:h100:8]

For each model (its ImageNet config: batch 256, bf16) and target, compiles the trainer's own
train step both ways (preflight.compile_train_step) and prints per-device memory and the
collectives in the compiled program. Collectives inside the branch that breaks ties within a
layer's threshold (taken only when a layer's threshold falls inside a run of equal scores) are
counted apart from the ones every step runs.
"""
from __future__ import annotations

import argparse
import collections
import os

import jax

from edgepopup_jax.planning import preflight, targets

MODES = ("replicated", "fsdp")


def collectives_by_branch(hlo: str) -> dict[tuple[str, bool], list[int]]:
    """{(op, in the tie branch): [count, bytes]} of the collectives in compiled HLO text."""
    out = collections.defaultdict(lambda: [0, 0])
    for line in hlo.splitlines():
        m = preflight._INSTRUCTION.search(line)
        if not m:
            continue
        shape, op, phase = m.groups()
        # The tie cut is the inner cond of the selection (the outer one is the per-platform choice).
        key = (op, line.count("cond/branch") >= 2)
        if phase != "-done":
            out[key][0] += 1
        if phase != "-start":
            out[key][1] += preflight._shape_bytes(shape)
    return dict(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wide_resnet50_2")
    parser.add_argument("--targets", default="gpu:h100:8")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")  # compile only: keep the accelerator plugins idle
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from edgepopup_jax.configs import imagenet

    print("| model | target | state_sharding | train arguments GiB/device | train peak GiB/device | "
          "collectives every step | collectives in the tie branch only |")
    print("|---" * 7 + "|")
    for name in args.models.split(","):
        for spec in args.targets.split(","):
            target = targets.parse_target(spec)
            for mode in MODES:
                config = imagenet.get_config(name)
                config.state_sharding = mode
                compiled = preflight.compile_train_step(config, target)
                memory = preflight.Memory.of(compiled)
                found = collectives_by_branch(compiled.as_text())
                cells = [", ".join(f"{found[k][0]} {k[0]} {found[k][1] / 2**20:.1f} MiB"
                                   for k in sorted(found) if k[1] == tie) or "none"
                         for tie in (False, True)]
                print(f"| {name} | {spec} | {mode} | {memory.argument / 2**30:.2f} | "
                      f"{memory.peak / 2**30:.2f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
