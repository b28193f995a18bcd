"""Records what the trainer computes, to compare a refactor of it against (issue 25).

  python benchmarks/trainer_goldens.py --record=docs/results/trainer_goldens.json
  python benchmarks/trainer_goldens.py --compare=docs/results/trainer_goldens.json

Per case: the loss at every step, the final top-1 and the final state's sha256. float32 results
are bit-identical only on the same CPU (XLA picks other kernels for AVX2 than for AVX-512), so
compare on the machine that recorded, or record the old commit first on yours (from a `git
worktree` of it: this file needs nothing newer). --compare prints a table and exits 1 when a
case's losses differ beyond float tolerance (rtol 1e-5) or its top-1 moved; it says which cases
are bit-identical. Each case runs in its own process, with its own device count.
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
RTOL = 1e-5

# name -> (simulated CPU devices, config overrides); the folder cases read a tiny image folder
CASES = {
    "default_device": (1, {}),
    "fc_tf_data": (1, {"data.pipeline": "tf_data"}),
    "resnet_folder_tf_data_1dev": (1, {"folder": True}),
    "resnet_folder_tf_data_8dev": (8, {"folder": True}),
}


def make_folder(root: str) -> None:
    """4 classes x (24 train + 8 test) 16x16 RGB PNGs of seeded noise around a class colour."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label in range(4):
            os.makedirs(os.path.join(root, split, f"c{label}"), exist_ok=True)
            for i in range(count):
                base = np.array([60 * label, 255 - 60 * label, 120], np.float32)
                pixels = np.clip(base + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"c{label}", f"{i}.png"))


def config_for(name: str, workdir: str):
    from edgepopup_jax.configs import default
    from edgepopup_jax.planning import grid
    c = default.get_config()
    c.num_train_steps, c.log_every_steps, c.batch_size = 40, 1, 32
    c.eval_every_steps = c.checkpoint_every_steps = 1000
    overrides = dict(CASES[name][1])
    if overrides.pop("folder", False):
        data_dir = os.path.join(workdir, "images")
        make_folder(data_dir)
        overrides.update({"data.name": "folder", "data.data_dir": data_dir,
                          "data.pipeline": "tf_data", "data.image_size": 16, "data.augment": "none",
                          "data.mean": (0.5, 0.5, 0.5), "data.std": (0.25, 0.25, 0.25),
                          "model.name": "cifar_resnet18", "model.width": 0.125,
                          "num_train_steps": 12, "eval_batch_size": 32})
    return grid.with_overrides(c, overrides)


def run_case(name: str) -> dict:
    """In this process (its XLA_FLAGS set by the caller): train the case, return its numbers."""
    import jax
    from edgepopup_jax.training import parallel
    from edgepopup_jax.training import loop
    with tempfile.TemporaryDirectory() as workdir:
        results = loop.train_config(config_for(name, workdir), os.path.join(workdir, "run"),
                                        devices=jax.devices())
    return {"losses": [h["loss"] for h in results["train_history"]],
            "top1": results["eval"]["top1"], "state_sha256": results["state_sha256"],
            "devices": len(jax.devices())}


def run_in_subprocess(name: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={CASES[name][0]}",
           "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--case={name}"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT)
    return done.stdout.strip() or "unknown"


def compare(old: dict, new: dict) -> bool:
    import numpy as np
    print(f"recorded: {old['commit']} on {old['machine']}; now: {new['commit']} on {new['machine']}")
    print(f"{'case':30s} {'steps':>5s} {'max rel loss diff':>18s} {'top-1 old':>9s} "
          f"{'top-1 new':>9s}  state")
    ok = True
    for name, was in old["cases"].items():
        now = new["cases"][name]
        a, b = np.asarray(was["losses"]), np.asarray(now["losses"])
        same_len = a.shape == b.shape
        diff = float(np.max(np.abs(a - b) / np.abs(a))) if same_len else float("inf")
        good = same_len and diff <= RTOL and was["top1"] == now["top1"]
        ok &= good
        state = "bit-identical" if was["state_sha256"] == now["state_sha256"] else "differs"
        print(f"{name:30s} {len(b):5d} {diff:18.2e} {was['top1']:9.4f} {now['top1']:9.4f}  "
              f"{state}{'' if good else '  <- CHANGED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", help="write the goldens here")
    parser.add_argument("--compare", help="compare with the goldens here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return 0
    if bool(args.record) == bool(args.compare):
        parser.error("give one of --record=FILE or --compare=FILE")
    if args.compare and not os.path.exists(args.compare):
        parser.error(f"--compare: no file {args.compare}")
    now = {"commit": git_commit(), "machine": cpu_name(), "cases": {}}
    for name in CASES:
        print(f"running {name} ...", flush=True)
        now["cases"][name] = run_in_subprocess(name)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(now, f, indent=1)
        print(f"recorded {len(CASES)} cases -> {args.record}")
        return 0
    with open(args.compare) as f:
        return 0 if compare(json.load(f), now) else 1


if __name__ == "__main__":
    sys.exit(main())
