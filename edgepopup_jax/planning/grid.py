"""Grids of runs for sweeps: dimensions of config overrides, seeds, and dense baselines.

A dimension is a list of points; a point is a label and the config overrides it sets (usually
one key, e.g. model.keep_fraction=0.3; a paper figure may set several, e.g. "scaled kaiming
normal"). Every combination of points x seed is one run; the baselines are one run per
combination of the dimensions they vary over x seed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any

import ml_collections

BOOLS = {"true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Dim:
    label: str
    points: tuple[Point, ...]


@dataclasses.dataclass(frozen=True)
class Grid:
    dims: tuple[Dim, ...]  # the first is the x axis of the figure
    seeds: tuple[int, ...]
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)  # {}: no baseline runs
    baseline_over: tuple[str, ...] = ()  # labels of the dims the baselines vary over
    panel: str | None = None  # label of a dim drawn as separate panels of the figure

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Grid:
        dims = tuple(Dim(x["label"], tuple(Point(p["label"], p["overrides"]) for p in x["points"]))
                     for x in d["dims"])
        return cls(dims, tuple(d["seeds"]), d["baseline"], tuple(d["baseline_over"]), d["panel"])


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # its sub-directory of the sweep's workdir
    overrides: dict[str, Any]  # seed included
    labels: dict[str, str]  # dim label -> point label (the baselines lack the dims they don't vary)
    seed: int
    baseline: bool


def field_type(config: ml_collections.ConfigDict, key: str) -> type:
    """The type of config's field `key` (dotted); a ValueError naming the allowed keys if none."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            allowed = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
            raise ValueError(f"unknown config key {key!r}: {where} has no field {part!r}"
                             + (f"; it has: {allowed}" if allowed else ""))
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise ValueError(f"config key {key!r} is a section, not a field; give one of its fields: "
                         f"{', '.join(sorted(node[parts[-1]].keys()))}")
    return node.get_type(parts[-1])


def parse_value(key: str, kind: type, text: str) -> Any:
    """text as a value of the field's type: bool (true/false), int, float (finite) or str."""
    text = text.strip()
    try:
        if kind is bool:
            return BOOLS[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except (KeyError, ValueError):
        allowed = "true or false" if kind is bool else f"a finite {kind.__name__}" if kind is float \
            else f"an {kind.__name__}"
        raise ValueError(f"bad value {text!r} for {key}: expected {allowed}") from None
    if kind is str:
        if not text:
            raise ValueError(f"empty value for {key}")
        return text
    raise ValueError(f"{key} holds a {kind.__name__}; only bool, int, float and str fields can be swept")


def parse_sweep(spec: str, config: ml_collections.ConfigDict) -> Dim:
    """'KEY=V1,V2,...' -> a Dim of one point per value, parsed to the field's type."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ValueError(f"bad --sweep {spec!r}: expected KEY=V1,V2,..., "
                         "e.g. model.keep_fraction=0.1,0.5,0.9")
    if key == "seed":
        raise ValueError("sweep seeds with --seeds=0,1,2, not --sweep=seed=...")
    kind = field_type(config, key)
    texts = [v.strip() for v in values.split(",")]
    parsed = [parse_value(key, kind, t) for t in texts]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"--sweep {key} repeats a value: {values}")
    return Dim(key, tuple(Point(t, {key: v}) for t, v in zip(texts, parsed)))


def parse_overrides(specs: list[str], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """['KEY=VALUE', ...] -> {KEY: value parsed to the field's type}."""
    out = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad override {spec!r}: expected KEY=VALUE, e.g. model.mask=dense")
        key = key.strip()
        out[key] = parse_value(key, field_type(config, key), text)
    return out


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"bad --seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {text}")
    return seeds


def check_grid(grid: Grid) -> None:
    labels = [d.label for d in grid.dims]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a dimension is swept twice: {labels}")
    if not grid.seeds:
        raise ValueError("no seeds: give --seeds, e.g. --seeds=0,1,2")
    for name in (*grid.baseline_over, *([grid.panel] if grid.panel else [])):
        if name not in labels:
            raise ValueError(f"{name!r} is not a swept dimension; the dimensions are {labels}")


def _dirname(labels: dict[str, str], seed: int) -> str:
    parts = [f"{k}={v}" for k, v in labels.items()] + [f"seed={seed}"]
    return ",".join(parts).replace("/", "_")


def expand(grid: Grid) -> list[Run]:
    """Every combination of the dims' points x seed, then the baselines; a fixed order."""
    check_grid(grid)
    runs = []
    for combo in itertools.product(*(d.points for d in grid.dims)):
        labels = {d.label: p.label for d, p in zip(grid.dims, combo)}
        overrides = {k: v for p in combo for k, v in p.overrides.items()}
        for seed in grid.seeds:
            runs.append(Run(_dirname(labels, seed), {**overrides, "seed": seed}, labels, seed, False))
    if grid.baseline:
        over = [d for d in grid.dims if d.label in grid.baseline_over]
        for combo in itertools.product(*(d.points for d in over)):
            labels = {d.label: p.label for d, p in zip(over, combo)}
            overrides = {k: v for p in combo for k, v in p.overrides.items()}
            for seed in grid.seeds:
                runs.append(Run("baseline," + _dirname(labels, seed),
                                {**overrides, **grid.baseline, "seed": seed}, labels, seed, True))
    return runs


def for_worker(runs: list[Run], worker: int, num_workers: int) -> list[Run]:
    """Worker i of n takes runs i, i+n, i+2n, ...: disjoint, together all, the same everywhere."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"--worker={worker} --num_workers={num_workers}: need num_workers >= 1 and "
                         f"0 <= worker < num_workers")
    return runs[worker::num_workers]


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config
