"""Short-budget CPU comparisons of edge-popup (EP) and its follow-up methods, each at EP's k and budget.

  PYTHONPATH=. .venv/bin/python benchmarks/followups_cpu.py mnist --workdir=runs/followups_mnist
      FC (LeNet-300-100) on MNIST-5k, configs/default.py's recipe (20 epochs, 1,240 steps of batch
      64, per-step cosine) at k = 0.3 with kaiming normal weights, 3 seeds, trained as groups
      (--parallel_runs, default 9): EP + Global EP + the cosine schedule share one program
  PYTHONPATH=. .venv/bin/python benchmarks/followups_cpu.py cifar --workdir=runs/followups_cifar \\
      --npz=/tmp/cifar10.npz [--seeds=0] [--methods=EP,GlobalEP,...]
      Conv2 on the real CIFAR-10 (an .npz of the PNG zip: see `npz` below), the paper's recipe
      but 1 epoch (390 steps of batch 128) with the cosine decayed per step, k = 0.3, kaiming
      normal, one run after another (grouped conv runs are slower per run on XLA:CPU)
  .venv/bin/python benchmarks/followups_cpu.py npz --zip=../shared/data/cifar10_png.zip --out=/tmp/cifar10.npz
      decodes the zip's 60,000 PNGs into the .npz that data.name=npz reads (about 1 minute)
  PYTHONPATH=. .venv/bin/python benchmarks/followups_cpu.py report --mnist=runs/followups_mnist \\
      --cifar=runs/followups_cifar --out=docs/results/followups_cpu
      both sweeps' results.csv -> OUT.csv (one row per run), OUT.png (top-1 per method, mean +-
      std over seeds, a panel per setting) and the markdown table on stdout

The methods, each only its own options changed from EP's (core/options.py, training/iterand.py,
training/sparsity.py): Global EP (mask_scope=global), EP + IteRand (bernoulli redraws of the
pruned weights with probability 0.1, every 100 steps on MNIST: 12 redraws in 1,240 steps; every
50 on CIFAR: 7 in 390), biprop (binary_weights: alpha * sign(W) on the mask), EP + a cosine
sparsity schedule (k from 1.0 down to 0.3 over the first third of training), EP + uniform score
init (U(-1, 1) instead of Kaiming-uniform). Kaiming normal weights throughout: with the default
config's signed constant weights biprop would be EP exactly (alpha * sign(W) = W when |W| is one
constant). EP + learned BN (bn_affine) applies to the ResNets only: FC and Conv2 have no BatchNorm.

These are short CPU budgets, not the paper's 100-epoch recipe: they show whether an option runs
and how it moves the accuracy early in training, not where it ends.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import pathlib
import sys
import zipfile

import numpy as np

MNIST_METHODS = {
    "EP": {},
    "GlobalEP": {"model.mask_scope": "global"},
    "EP+IteRand": {"model.rerand_every": 100, "model.rerand_rate": 0.1, "model.rerand_mode": "bernoulli"},
    "biprop": {"model.binary_weights": True},
    "EP+cosine_k": {"model.keep_fraction_anneal_epochs": 7.0, "model.keep_fraction_start": 1.0,
                    "model.keep_fraction_anneal": "cosine"},
    "EP+uniform_scores": {"model.score_init": "uniform"},
    # prune, then fine-tune, in the same 1,240 steps: 15 epochs of scores, 5 of the kept weights
    "EP+finetune": {"num_epochs": 15.0, "finetune_epochs": 5.0},
}
CIFAR_METHODS = {
    **{k: v for k, v in MNIST_METHODS.items() if k != "EP+finetune"},
    "EP+IteRand": {"model.rerand_every": 50, "model.rerand_rate": 0.1, "model.rerand_mode": "bernoulli"},
    "EP+cosine_k": {"model.keep_fraction_anneal_epochs": 0.33, "model.keep_fraction_start": 1.0,
                    "model.keep_fraction_anneal": "cosine"},
}
KEEP_FRACTION = 0.3
SETTINGS = {"mnist": "FC, MNIST-5k (20 epochs, 1,240 steps)", "cifar": "Conv2, CIFAR-10 (1 epoch, 390 steps)"}


def _grid(methods: dict, seeds):
    from edgepopup_jax.planning.grid import Dim, Grid, Point
    return Grid((Dim("method", tuple(Point(n, o) for n, o in methods.items())),), tuple(seeds))


def mnist_config():
    from edgepopup_jax.configs import default
    from edgepopup_jax.planning import grid as grid_lib
    return grid_lib.with_overrides(default.get_config(), {
        "model.keep_fraction": KEEP_FRACTION, "model.weight_init": "kaiming_normal",
        "data.pipeline": "device"})


def cifar_config(npz: str):
    from edgepopup_jax.configs import cifar10
    from edgepopup_jax.planning import grid as grid_lib
    return grid_lib.with_overrides(cifar10.get_config("conv2"), {
        "model.keep_fraction": KEEP_FRACTION, "model.weight_init": "kaiming_normal",
        "data.name": "npz", "data.data_dir": os.path.abspath(npz), "data.pipeline": "device",
        "num_epochs": 1.0, "optim.schedule_unit": "step", "log_every_steps": 50})


def _pick(table: dict, names: str | None) -> dict:
    if not names:
        return table
    unknown = [n for n in names.split(",") if n not in table]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; allowed: {', '.join(table)}")
    return {n: table[n] for n in names.split(",")}


def run(args) -> None:
    from edgepopup_jax.planning import sweep
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.what == "mnist":
        base, methods = mnist_config(), _pick(MNIST_METHODS, args.methods)
    else:
        if not args.npz or not os.path.exists(args.npz):
            raise SystemExit("error: cifar needs --npz=PATH (make it with the `npz` command)")
        base, methods = cifar_config(args.npz), _pick(CIFAR_METHODS, args.methods)
    grid = _grid(methods, seeds)
    if args.parallel_runs > 1:
        sweep.run_sweep_parallel(base, grid, args.workdir, parallel_runs=args.parallel_runs)
    else:
        sweep.run_sweep(base, grid, args.workdir)


def npz(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cifar_carry
    with zipfile.ZipFile(args.zip) as archive:
        arrays = {}
        for split in ("train", "test"):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = cifar_carry._split_arrays(archive, split, None)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)
    print(f"{args.out}: {({k: v.shape for k, v in arrays.items()})}")


def _read(workdir: str, setting: str) -> list[dict]:
    path = pathlib.Path(workdir) / "results.csv"
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    return [{"setting": setting, "method": r["method"], "keep_fraction": KEEP_FRACTION,
             "seed": int(r["seed"]), "top1": float(r["top1"]), "steps": int(r["steps"]),
             "wall_time_sec": float(r["wall_time_sec"])} for r in rows]


def report(args) -> None:
    rows = []
    for what in ("mnist", "cifar"):
        if getattr(args, what):
            rows += _read(getattr(args, what), SETTINGS[what])
    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    pathlib.Path(args.out + ".csv").write_text(out.getvalue())

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    # std: the sample std over the seeds (ddof=1); "beyond the seed spread": the mean's difference
    # from EP's exceeds twice the larger of the two stds
    print("| setting | method | k | seeds | top-1 % (mean +- std) | vs EP (mean difference) | beyond the seed spread? |")
    print("|---|---|---:|---:|---:|---:|---|")
    stats = {}
    for setting in settings:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["setting"] == setting))
        for m in methods:
            accs = np.array([r["top1"] for r in rows if r["setting"] == setting and r["method"] == m]) * 100
            stats[setting, m] = accs
        ep = stats[setting, "EP"]
        for m in methods:
            accs = stats[setting, m]
            std = f" +- {accs.std(ddof=1):.2f}" if len(accs) > 1 else ""
            if m == "EP":
                diff, verdict = "-", "-"
            else:
                d = accs.mean() - ep.mean()
                diff = f"{d:+.2f}"
                if len(accs) > 1 and len(ep) > 1:
                    spread = max(accs.std(ddof=1), ep.std(ddof=1))
                    verdict = (f"yes: {abs(d):.2f} > 2 x {spread:.2f}" if abs(d) > 2 * spread
                               else f"no: {abs(d):.2f} <= 2 x {spread:.2f}")
                else:
                    verdict = "one seed: no spread to compare with"
            print(f"| {setting} | {m} | {KEEP_FRACTION} | {len(accs)} | {accs.mean():.2f}{std} | {diff} | {verdict} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.0), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        methods = [m for (s, m) in stats if s == setting]
        means = [stats[setting, m].mean() for m in methods]
        stds = [stats[setting, m].std(ddof=1) if len(stats[setting, m]) > 1 else 0.0 for m in methods]
        xs = np.arange(len(methods))
        # points, not bars: the y axis does not start at 0
        ax.axhline(means[methods.index("EP")], color="0.5", linestyle="--", lw=1, label="EP's mean")
        ax.errorbar(xs, means, yerr=stds, fmt="o", color="C0", capsize=4, label="mean +- std")
        for x, m in zip(xs, methods):  # every seed's value
            ax.plot([x + 0.15] * len(stats[setting, m]), stats[setting, m], "k.", ms=4,
                    label="a seed" if x == 0 else None)
        lo = min(float(stats[setting, m].min()) for m in methods)
        hi = max(float(stats[setting, m].max()) for m in methods)
        ax.set_ylim(lo - 0.15 * (hi - lo) - 1, hi + 0.15 * (hi - lo) + 0.5)
        ax.set_xticks(xs, methods, rotation=30, ha="right")
        n = len(stats[setting, "EP"])
        ax.set_title(f"{setting}\nk = {KEEP_FRACTION}, {n} seed(s), 2-core CPU", fontsize=9)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Short-budget CPU runs, not the paper's recipe", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"\n-> {args.out}.csv, {args.out}.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for what in ("mnist", "cifar"):
        s = sub.add_parser(what)
        s.add_argument("--workdir", required=True)
        s.add_argument("--seeds", default="0,1,2" if what == "mnist" else "0")
        s.add_argument("--methods", default=None, help="a comma-separated subset of the methods")
        s.add_argument("--parallel_runs", type=int, default=9 if what == "mnist" else 1)
        if what == "cifar":
            s.add_argument("--npz", default=None)
    n = sub.add_parser("npz")
    n.add_argument("--zip", required=True)
    n.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--mnist", default=None)
    r.add_argument("--cifar", default=None)
    r.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"mnist": run, "cifar": run, "npz": npz, "report": report}[args.what](args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
