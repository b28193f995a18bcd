"""Old trainer against new, side by side in one run (issue 25: one loop, one step).

  git worktree add /tmp/old <old commit>
  PYTHONPATH=. .venv/bin/python benchmarks/one_trainer.py --old=/tmp/old [--rounds 3]

Each case trains from main.py's entry (`train_config`) in a subprocess of the old checkout and
of this one, alternating old, new, old, new ..., and reads the run's own images/s (the median
of its log intervals after the first, which includes compilation). Cases:
  single_tf_data   one FC run on MNIST-5k through tf.data (the old single-run trainer)
  single_device    one FC run on MNIST-5k, the data on the device
  grid_11          11 FC runs as one program (--parallel_runs=11), the data on the device
  jpeg_stream      one small FC run on 500x375 JPEGs through tf.data with the ImageNet
                   augmentation (decode, random resized crop to 64x64, flip): the input path
Prints a table of medians over the rounds and the new / old ratio of images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "single_tf_data": {"data.pipeline": "tf_data", "num_train_steps": 240},
    "single_device": {"data.pipeline": "device", "num_train_steps": 240},
    "grid_11": {"data.pipeline": "device", "num_train_steps": 120, "parallel_runs": 11},
    "jpeg_stream": {"jpeg": True, "num_train_steps": 30},
}

RUN = r"""
import json, os, sys, tempfile
sys.path.insert(0, os.getcwd())
from edgepopup_jax.configs import default
from edgepopup_jax.planning import grid
try:
    from edgepopup_jax.training.loop import train_config
except ImportError:
    from edgepopup_jax.training.parallel import train_config
overrides = json.loads(sys.argv[1])
c = default.get_config()
c.batch_size, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 128, 10, 100000, 100000
c = grid.with_overrides(c, overrides)
with tempfile.TemporaryDirectory() as workdir:
    results = train_config(c, os.path.join(workdir, "run"))
results = results if isinstance(results, list) else [results]
print("RESULT", json.dumps(sum(r["images_per_sec"] for r in results)))
"""


def make_jpegs(root: str, count: int = 512) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("test", 64)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % 10}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), np.uint8)).save(
                os.path.join(d, f"{i}.jpg"), quality=90)


def overrides_for(case: str, jpegs: str) -> dict:
    o = dict(CASES[case])
    if o.pop("jpeg", False):
        o.update({"data.name": "folder", "data.data_dir": jpegs, "data.pipeline": "tf_data",
                  "data.augment": "imagenet", "data.image_size": 64, "data.cache": False,
                  "data.mean": [0.5], "data.std": [0.25], "data.shuffle_buffer": 512})
    return o


def images_per_sec(checkout: str, overrides: dict) -> float:
    env = {**os.environ, "PYTHONPATH": checkout, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(overrides)], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=1800)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{checkout}: {out.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, help="a checkout of the commit before the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores; median of {args.rounds} alternating rounds; images/s "
          "summed over a group's runs\n")
    print("| case | old img/s | new img/s | new / old |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as jpegs:
        make_jpegs(jpegs)
        for case in args.cases.split(","):
            o = overrides_for(case, jpegs)
            times = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name, checkout in (("old", args.old), ("new", ROOT)):
                    times[name].append(images_per_sec(checkout, o))
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(f"| {case} | {med['old']:,.0f} | {med['new']:,.0f} | {med['new'] / med['old']:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
