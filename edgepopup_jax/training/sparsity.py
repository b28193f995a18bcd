"""Sparsity schedules: keep_fraction annealed from a start down to its target, step by step.

The follow-ups that grow the sparsity during training (biprop's and Gem-Miner's global EP,
Diffenderfer & Kailkhura, ICLR 2021; Sreenivasan et al., NeurIPS 2022) keep everything at
first and prune towards the target over the first epochs. Three `model.` fields say how:

  keep_fraction_anneal_epochs  E: epochs over which k goes from the start to keep_fraction
                               (0: off, keep_fraction from the first step; the default)
  keep_fraction_start          k at step 0 (default 1.0: every weight kept)
  keep_fraction_anneal         linear: k = start + (target - start) * t
                               cosine: k = target + (start - target) * (1 + cos(pi t)) / 2

with t = min(step / S, 1) and S = round(E * steps per epoch) steps. Layers with their own
target (model.first_last_keep_fraction, linear_keep_fraction) anneal from the same start to it. The step's k sets that
step's kept counts exactly as a fixed k would (masking.kept_count of each layer, or of all
layers for mask_scope "global"): the host computes them in float64 and hands them to the
jitted step, so a schedule costs no recompilation and the counts are exact at every step.
k is a function of the step, so a resumed run goes on with the same k as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math

ANNEALS = ("linear", "cosine")
FIELDS = ("keep_fraction_start", "keep_fraction_anneal_epochs", "keep_fraction_anneal")
DEFAULTS = {"keep_fraction_start": 1.0, "keep_fraction_anneal_epochs": 0.0,
            "keep_fraction_anneal": "linear"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    target: float
    start: float = 1.0
    steps: int = 0  # S: annealing steps (0: off)
    anneal: str = "linear"

    @property
    def active(self) -> bool:
        return self.steps > 0

    def keep_fraction(self, step: int, target: float | None = None) -> float:
        """k at `step` (0-based: the step about to be taken); the target from step S on.
        target: a layer's own target (first_last / linear_keep_fraction; default: keep_fraction)."""
        target = self.target if target is None else target
        if not self.active or step >= self.steps:
            return target
        t = max(step, 0) / self.steps
        if self.anneal == "linear":
            return self.start + (target - self.start) * t
        return target + (self.start - target) * 0.5 * (1.0 + math.cos(math.pi * t))


def check(model_config) -> None:
    """Raises ValueError naming the field and its allowed values."""
    start = model_config.get("keep_fraction_start", 1.0)
    epochs = model_config.get("keep_fraction_anneal_epochs", 0.0)
    anneal = model_config.get("keep_fraction_anneal", "linear")
    if anneal not in ANNEALS:
        raise ValueError(f"unknown model.keep_fraction_anneal {anneal!r}; allowed: {', '.join(ANNEALS)}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0:
        raise ValueError(f"model.keep_fraction_anneal_epochs must be a number >= 0 (0: no "
                         f"schedule), got {epochs!r}")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1:
        raise ValueError(f"model.keep_fraction_start must be in (0, 1], got {start!r}")
    for field in ("keep_fraction", "first_last_keep_fraction", "linear_keep_fraction"):
        target = model_config.get(field)
        if epochs > 0 and target is not None and start < target:
            raise ValueError(f"model.keep_fraction_start ({start}) is below model.{field} "
                             f"({target}): a schedule anneals down to the target")
    if epochs > 0 and model_config.get("mask", "edge_popup") != "edge_popup":
        raise ValueError(f"model.keep_fraction_anneal_epochs ({epochs}) needs model.mask="
                         f"'edge_popup' (a top-k mask), not {model_config.mask!r}")


def schedule(model_config, steps_per_epoch: int) -> Schedule:
    check(model_config)
    epochs = model_config.get("keep_fraction_anneal_epochs", 0.0)
    return Schedule(target=model_config.keep_fraction,
                    start=float(model_config.get("keep_fraction_start", 1.0)),
                    steps=int(round(epochs * steps_per_epoch)),
                    anneal=model_config.get("keep_fraction_anneal", "linear"))


