"""Sweeps: one command for a grid of runs, with a results table and a figure.

  python -m edgepopup_jax.planning.sweep --config=configs/cifar10.py:conv4 --workdir=runs/k_sweep \\
      --sweep=model.keep_fraction=0.1,0.3,0.5,0.7,0.9 \\
      --sweep=model.weight_init=kaiming_normal,signed_constant --seeds=0,1,2 [--config.num_epochs=10]
  python -m edgepopup_jax.planning.sweep --figure=keep_fraction --workdir=runs/fig3   # a paper figure
  python -m edgepopup_jax.planning.sweep --workdir=runs/k_sweep --plot_only          # redraw

Every --sweep is one dimension; every combination x seed is one run, trained by the trainer in
workdir/runs/<name> with its own checkpoints. Rerunning the command resumes the interrupted run
and skips the finished ones. Workers sharing a workdir (--worker=i --num_workers=n, e.g. one per
GPU or host) take runs i, i+n, i+2n, ... After each run, workdir/results.csv (one row per
finished run) and workdir/sweep.png (top-1 against the first swept value, one line per
combination of the others, mean +- std over seeds) are rewritten from all finished runs.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from typing import Callable

import ml_collections
from etils import epath

from edgepopup_jax.training import command, files, optim, parallel, train, workdir_lock
from edgepopup_jax.training import loop
from edgepopup_jax.planning import grid as grid_lib
from edgepopup_jax.planning import paper_figures, sweep_plot

GRID_FILE, TABLE_FILE, FIGURE_FILE, STATUS_FILE = "sweep.json", "results.csv", "sweep.png", "sweep_status.json"
RESULT_COLUMNS = ("seed", "baseline", "status", "top1", "top5", "weights_kept", "weights_total",
                  "steps", "wall_time_sec", "run")


class Stopped(Exception):
    """A run was stopped (SIGTERM or a stop request); its checkpoint is saved, rerun to resume."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """What can be checked without data: the model's options and the optimizer's."""
    if config.get("parallel_runs", 1) != 1:
        raise ValueError(f"parallel_runs={config.parallel_runs} is main.py's (seeds of one config); "
                         "a sweep groups its grid points with --parallel_runs=R")
    train.build_model(config, num_classes=10)
    optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 100, 10))


def _normalised(d):
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def run_dir(workdir, run: grid_lib.Run) -> epath.Path:
    return epath.Path(workdir) / "runs" / run.name


def finished(directory: epath.Path, config: ml_collections.ConfigDict) -> dict | None:
    """The run's results if it finished (or diverged), None if it has yet to (or to resume).
    A ValueError if the directory holds a run of another config."""
    if (directory / STATUS_FILE).exists():
        return json.loads((directory / STATUS_FILE).read_text())
    if not (directory / "results.json").exists():
        return None
    results = json.loads((directory / "results.json").read_text())
    saved, wanted = _normalised(results["config"]), _normalised(config.to_dict())
    if saved != wanted:
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(f"{directory} holds a run of another config (its {', '.join(differ)} "
                         "differ); give the sweep a new --workdir, or delete that run")
    if results["preempted"] or results["step"] < results["total_steps"]:
        return None
    return {"status": "ok", **results}


def latest_checkpoint(directory: epath.Path) -> int | None:
    """The step of the run's latest complete checkpoint (orbax names them by step)."""
    steps = [int(p.name) for p in (directory / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=None)


def _row(run: grid_lib.Run, result: dict | None) -> dict:
    row = {**run.labels, "seed": run.seed, "baseline": run.baseline, "run": run.name}
    if result is None:
        return row
    row["status"] = result["status"]
    if result["status"] == "ok":
        row.update(top1=result["eval"]["top1"], top5=result["eval"]["top5"],
                   weights_kept=result["weights_kept"], weights_total=result["weights_total"],
                   steps=result["step"], wall_time_sec=round(result["wall_time_sec"], 1))
    return row


def collect(workdir, grid: grid_lib.Grid, base: ml_collections.ConfigDict,
            known: dict[str, dict] | None = None) -> list[dict]:
    """One row per finished run of the grid (all workers'), in the grid's order.

    known: rows already read, by run name, filled in here: a finished run's results never
    change, so a long sweep reads each results.json once, not after every run.
    """
    known = {} if known is None else known
    rows = []
    for run in grid_lib.expand(grid):
        directory = run_dir(workdir, run)
        if run.name not in known and ((directory / "results.json").exists()
                                      or (directory / STATUS_FILE).exists()):
            result = finished(directory, grid_lib.with_overrides(base, run.overrides))
            if result is not None:
                known[run.name] = _row(run, result)
        if run.name in known:
            rows.append(known[run.name])
    return rows


def write_outputs(workdir, grid: grid_lib.Grid, rows: list[dict]) -> None:
    """results.csv and sweep.png from the finished runs' rows."""
    columns = [d.label for d in grid.dims] + list(RESULT_COLUMNS)
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomically(epath.Path(workdir) / TABLE_FILE, out.getvalue().encode())
    files.write_atomically(epath.Path(workdir) / FIGURE_FILE, sweep_plot.plot(grid, rows))


def save_grid(workdir, grid: grid_lib.Grid, base: ml_collections.ConfigDict) -> None:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    data = {"grid": grid.to_json(), "config": base.to_dict()}
    files.write_atomically(epath.Path(workdir) / GRID_FILE, json.dumps(data, indent=1, default=str).encode())


def load_grid(workdir) -> tuple[grid_lib.Grid, ml_collections.ConfigDict]:
    path = epath.Path(workdir) / GRID_FILE
    if not path.exists():
        raise ValueError(f"{workdir} holds no sweep ({GRID_FILE} is missing): run the sweep first")
    data = json.loads(path.read_text())
    return grid_lib.Grid.from_json(data["grid"]), ml_collections.ConfigDict(data["config"])


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _start(base, grid: grid_lib.Grid, workdir: str, worker: int, num_workers: int):
    """Checks every run's config, refuses a workdir of another recipe, saves the grid.
    Returns (all runs, config by run name, this worker's runs, rows of finished runs)."""
    runs = grid_lib.expand(grid)
    configs = {run.name: grid_lib.with_overrides(base, run.overrides) for run in runs}
    for run in runs:
        try:
            check_config(configs[run.name])
        except ValueError as e:
            raise ValueError(f"run {run.name}: {e}") from None
    mine = grid_lib.for_worker(runs, worker, num_workers)
    known: dict[str, dict] = {}  # rows of finished runs
    collect(workdir, grid, base, known)  # refuses a workdir of another recipe before writing to it
    save_grid(workdir, grid, base)
    return runs, configs, mine, known


def _finish(workdir, grid, base, known: dict, num_runs: int, say) -> list[dict]:
    """The table and figure from every finished run, said in one line; the rows."""
    rows = collect(workdir, grid, base, known)
    write_outputs(workdir, grid, rows)
    say(f"sweep: {len(rows)} of {num_runs} runs finished -> {epath.Path(workdir) / TABLE_FILE}, "
        f"{epath.Path(workdir) / FIGURE_FILE}")
    return rows


def run_sweep(base: ml_collections.ConfigDict, grid: grid_lib.Grid, workdir: str, *, worker: int = 0,
              num_workers: int = 1, say: Callable[[str], None] = print,
              train_fn=loop.train_config) -> list[dict]:
    """Trains this worker's runs of the grid that have not finished, one after another (each on
    the pipeline its config resolves to); returns all finished rows.

    Every run's config is checked before the first run starts. Raises ValueError for a bad
    grid or config, Stopped when a run is stopped (SIGTERM): rerun the same command to resume.
    """
    runs, configs, mine, known = _start(base, grid, workdir, worker, num_workers)
    say(f"sweep: {len(runs)} runs in {workdir}, {len(mine)} for worker {worker} of {num_workers}")
    trained, seconds = 0, 0.0
    for i, run in enumerate(mine, 1):
        directory, config = run_dir(workdir, run), configs[run.name]
        if run.name not in known and (result := finished(directory, config)) is not None:
            known[run.name] = _row(run, result)  # finished since the start, by another worker
        if run.name in known:
            row = known[run.name]
            top1 = f"top-1 {row['top1']:.4f}" if row["status"] == "ok" else row["status"]
            say(f"[{i}/{len(mine)}] {run.name}: finished earlier ({top1}), skipped")
            continue
        resume = latest_checkpoint(directory)
        say(f"[{i}/{len(mine)}] {run.name}: " + (f"resuming from step {resume}" if resume else "training"))
        t0 = time.time()
        try:
            results = train_fn(config, str(directory))
        except train.TrainingDiverged as e:
            result = {"status": "diverged", "message": str(e)}
            files.write_atomically(directory / STATUS_FILE, json.dumps(result).encode())
            say(f"[{i}/{len(mine)}] {run.name}: diverged ({e})")
        else:
            if results["preempted"]:
                write_outputs(workdir, grid, collect(workdir, grid, base, known))
                raise Stopped(f"stopped during run {run.name} at step {results['step']}; its "
                              "checkpoint is saved: rerun the same command to resume")
            trained, seconds = trained + 1, seconds + time.time() - t0
        rows = collect(workdir, grid, base, known)
        write_outputs(workdir, grid, rows)
        if run.name in known and known[run.name]["status"] == "ok":
            left = sum(r.name not in known for r in mine[i:])
            say(f"[{i}/{len(mine)}] {run.name}: top-1 {known[run.name]['top1']:.4f} in "
                f"{time.time() - t0:.0f} s; {left} to go, ETA {_eta(seconds / trained * left)}")
    return _finish(workdir, grid, base, known, len(runs), say)


def _groups(runs: list[grid_lib.Run], configs: dict, size: int) -> list[list[grid_lib.Run]]:
    """The runs in groups of at most `size` that can train as one program (parallel.group_key),
    in the grid's order within each kind."""
    kinds: dict[str, list[grid_lib.Run]] = {}
    for run in runs:
        kinds.setdefault(parallel.group_key(configs[run.name]), []).append(run)
    return [same[i:i + size] for same in kinds.values() for i in range(0, len(same), size)]


def run_sweep_parallel(base: ml_collections.ConfigDict, grid: grid_lib.Grid, workdir: str, *,
                       parallel_runs: int, worker: int = 0, num_workers: int = 1,
                       say: Callable[[str], None] = print, train_group=None) -> list[dict]:
    """run_sweep with up to parallel_runs runs trained at once, as one program on the device
    data path (loop.train_group): the unfinished runs of this worker are grouped by what
    they share, and each group trains, checkpoints and resumes as one. Every run still gets its
    own directory, results.json and CSV row, as with run_sweep."""
    train_group = train_group or loop.train_group
    if parallel_runs < 1:
        raise ValueError(f"--parallel_runs must be >= 1, got {parallel_runs}")
    runs, configs, mine, known = _start(base, grid, workdir, worker, num_workers)
    todo = [run for run in mine if run.name not in known]
    groups = _groups(todo, configs, parallel_runs)
    say(f"sweep: {len(runs)} runs in {workdir}, {len(mine)} for worker {worker} of {num_workers}; "
        f"{len(mine) - len(todo)} finished earlier, {len(todo)} to train in {len(groups)} "
        f"group(s) of up to {parallel_runs}")
    t_all = time.time()
    for i, group in enumerate(groups, 1):
        names = ", ".join(run.name for run in group)
        resume = [latest_checkpoint(run_dir(workdir, run)) for run in group]
        say(f"[group {i}/{len(groups)}] {len(group)} runs: {names}" +
            (f" (checkpoints up to step {max(s for s in resume if s)})" if any(resume) else ""))
        t0 = time.time()
        results = train_group([configs[run.name] for run in group],
                              [str(run_dir(workdir, run)) for run in group],
                              say=lambda line: say(f"[group {i}/{len(groups)}] {line}"))
        for run, result in zip(group, results):
            if result.get("status") == "diverged":
                files.write_atomically(run_dir(workdir, run) / STATUS_FILE, json.dumps(result).encode())
                say(f"[group {i}/{len(groups)}] {run.name}: diverged ({result['message']})")
        rows = collect(workdir, grid, base, known)
        write_outputs(workdir, grid, rows)
        if any(r.get("preempted") for r in results):
            raise Stopped(f"stopped during group {i} at step {results[0]['step']}; its "
                          "checkpoints are saved: rerun the same command to resume")
        left = len(groups) - i
        say(f"[group {i}/{len(groups)}] done in {time.time() - t0:.0f} s; {left} group(s) to go, "
            f"ETA {_eta((time.time() - t_all) / i * left)}")
    return _finish(workdir, grid, base, known, len(runs), say)


def make_grid(config, sweeps: list[str], seeds: str | None, figure: str | None,
              baseline: list[str], baseline_over: list[str]) -> grid_lib.Grid:
    """The grid from the command line: --sweep/--baseline specs, or a named paper figure."""
    if figure is not None:
        if sweeps or baseline or baseline_over:
            raise ValueError("--figure sets the grid: give no --sweep, --baseline or --baseline_over")
        grid = paper_figures.FIGURES[figure].grid
        return grid if seeds is None else grid_lib.Grid(grid.dims, grid_lib.parse_seeds(seeds),
                                                        grid.baseline, grid.baseline_over, grid.panel)
    if not sweeps:
        raise ValueError("nothing to sweep: give --sweep=KEY=V1,V2,... (one per dimension) or "
                         f"--figure (one of {', '.join(paper_figures.FIGURES)})")
    dims = tuple(grid_lib.parse_sweep(s, config) for s in sweeps)
    grid = grid_lib.Grid(dims, grid_lib.parse_seeds(seeds or "0"),
                         grid_lib.parse_overrides(baseline, config), tuple(baseline_over))
    grid_lib.check_grid(grid)
    return grid


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "The base config (configs/*.py[:arg]); "
                                    "--config.FIELD=VALUE overrides apply to every run.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "The sweep's directory: runs/, results.csv, sweep.png.")
    flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: one dimension of the grid.")
    flags.DEFINE_string("seeds", None, "Seeds, e.g. 0,1,2 (default 0, or the figure's).")
    flags.DEFINE_enum("figure", None, list(paper_figures.FIGURES), "A paper figure: its grid, "
                      "baselines and config (" + "; ".join(f"{k}: {f.description}"
                                                         for k, f in paper_figures.FIGURES.items()) + ")")
    flags.DEFINE_multi_string("baseline", [], "KEY=VALUE overrides of baseline runs, e.g. "
                              "model.mask=dense (with --sweep; --figure brings its own).")
    flags.DEFINE_list("baseline_over", [], "Swept keys the baselines vary over (default: none).")
    flags.DEFINE_integer("worker", 0, "This worker's index, 0 <= worker < num_workers.")
    flags.DEFINE_integer("num_workers", 1, "Workers sharing the sweep.")
    flags.DEFINE_integer("parallel_runs", 1, "Train up to this many runs at once, as one program "
                         "with the data on the device (grid points that share the model, data "
                         "and batch are grouped).")
    flags.DEFINE_bool("plot_only", False, "Only rewrite results.csv and sweep.png from finished runs.")
    flags.DEFINE_bool("verbose", False, "Show the trainer's log lines (steps, evaluations).")
    flags.mark_flags_as_required(["workdir"])


def main(argv) -> int:
    from absl import app, flags, logging
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
    try:
        if FLAGS.plot_only:
            grid, base = load_grid(FLAGS.workdir)
            rows = collect(FLAGS.workdir, grid, base)
            write_outputs(FLAGS.workdir, grid, rows)
            print(f"{len(rows)} finished runs -> {FLAGS.workdir}/{TABLE_FILE}, {FLAGS.workdir}/{FIGURE_FILE}")
            return 0
        base = FLAGS.config
        if base is None:
            if FLAGS.figure is None:
                raise ValueError("give --config (or --figure, which brings its own)")
            base = paper_figures.FIGURES[FLAGS.figure].config()
        if FLAGS.figure is not None:
            base = grid_lib.with_overrides(base, paper_figures.FIGURES[FLAGS.figure].fixed)
        grid = make_grid(base, FLAGS.sweep, FLAGS.seeds, FLAGS.figure, FLAGS.baseline,
                         FLAGS.baseline_over)
        if FLAGS.parallel_runs != 1:
            run_sweep_parallel(base, grid, FLAGS.workdir, parallel_runs=FLAGS.parallel_runs,
                               worker=FLAGS.worker, num_workers=FLAGS.num_workers)
        else:
            run_sweep(base, grid, FLAGS.workdir, worker=FLAGS.worker, num_workers=FLAGS.num_workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except workdir_lock.WorkdirBusy as e:  # a run's directory is another job's
        print(f"error: {e}", file=sys.stderr)
        return workdir_lock.BUSY_EXIT
    return 0


def cli():
    """`python -m edgepopup_jax.planning.sweep` and the `edgepopup-sweep` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    command.run(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()
