"""A sparsity plan: consecutive layer groups, one sparsity rate each, and how it was chosen."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

PLAN_SCHEMA = "asaf_fx.plan/1"


@dataclass(frozen=True)
class Group:
    """Layers ``start .. stop - 1`` (stop exclusive), all pruned at ``sparsity``."""

    start: int
    stop: int
    sparsity: float

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """Which sparsity each decoder layer gets.

    Args:
        groups: consecutive groups covering layers ``0 .. num_layers - 1`` exactly once, in order.
        flops: planned FLOPs per token of the decoder layers' linears (from the table's H).
        dense_flops: the same layers unpruned.
        predicted_degradation: Σ of the chosen groups' charged Ξ (unrounded; an upper bound with
            noise, see ``solvers.problem.charged_degradation``), in the table's metric.
        max_degradation: the budget the plan was solved for.
        method: the solver that produced it ("exact", "two-phase", "greedy", "uniform", ...).
        stats: solver statistics (``time_s``, ``states``, ``resolution``, ...).
    """

    groups: tuple[Group, ...]
    flops: float
    dense_flops: float
    predicted_degradation: float
    max_degradation: float
    method: str
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = tuple(g if isinstance(g, Group) else Group(**g) for g in self.groups)
        if not groups:
            raise ValueError("Plan: groups is empty; a plan covers at least one layer")
        expected_start = 0
        for index, group in enumerate(groups):
            if group.start != expected_start or group.stop <= group.start:
                raise ValueError(
                    f"Plan: group {index} is layers [{group.start}, {group.stop}); groups must be non-empty, "
                    f"consecutive and start at layer {expected_start}"
                )
            if not (0.0 <= group.sparsity < 1.0) or not math.isfinite(group.sparsity):
                raise ValueError(f"Plan: group {index} has sparsity {group.sparsity!r}; it must lie in [0, 1)")
            expected_start = group.stop
        for name in ("flops", "dense_flops", "predicted_degradation", "max_degradation"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Plan: {name} must be finite, got {getattr(self, name)!r}")
        if self.dense_flops <= 0 or self.flops < 0:
            raise ValueError(f"Plan: need dense_flops > 0 and flops >= 0, got {self.dense_flops}, {self.flops}")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "stats", dict(self.stats))

    @property
    def num_layers(self) -> int:
        return self.groups[-1].stop

    @property
    def layer_sparsity(self) -> tuple[float, ...]:
        return tuple(g.sparsity for g in self.groups for _ in range(g.length))

    @property
    def flops_ratio(self) -> float:
        """Planned FLOPs / dense FLOPs."""
        return self.flops / self.dense_flops

    def check_layers(self, num_layers: int) -> None:
        """Refuse a plan made for a model with a different number of decoder layers."""
        if self.num_layers != num_layers:
            raise ValueError(
                f"this plan covers {self.num_layers} decoder layers but the model has {num_layers}; "
                "solve a plan from a table calibrated on this model"
            )

    def to_json(self) -> str:
        body = {
            "schema": PLAN_SCHEMA,
            "num_layers": self.num_layers,
            "groups": [{"start": g.start, "stop": g.stop, "sparsity": g.sparsity} for g in self.groups],
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "predicted_degradation": self.predicted_degradation,
            "max_degradation": self.max_degradation,
            "method": self.method,
            "stats": self.stats,
        }
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str, *, num_layers: int | None = None) -> Plan:
        """Parse :meth:`to_json` output; with ``num_layers``, also refuse a plan for another model."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Plan.from_json: not JSON ({exc})") from exc
        if not isinstance(body, dict) or body.get("schema") != PLAN_SCHEMA:
            found = body.get("schema") if isinstance(body, dict) else type(body).__name__
            raise ValueError(f"Plan.from_json: schema {found!r} is not {PLAN_SCHEMA!r}; re-solve with this asaf_fx")
        try:
            plan = cls(
                groups=tuple(Group(int(g["start"]), int(g["stop"]), float(g["sparsity"])) for g in body["groups"]),
                flops=float(body["flops"]),
                dense_flops=float(body["dense_flops"]),
                predicted_degradation=float(body["predicted_degradation"]),
                max_degradation=float(body["max_degradation"]),
                method=str(body["method"]),
                stats=dict(body.get("stats", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"Plan.from_json: missing or malformed field {exc}") from exc
        if body.get("num_layers") != plan.num_layers:
            raise ValueError(
                f"Plan.from_json: num_layers {body.get('num_layers')!r} disagrees with groups covering "
                f"{plan.num_layers}"
            )
        if num_layers is not None:
            plan.check_layers(num_layers)
        return plan


def uniform_plan(num_layers: int, sparsity: float, dense_flops: float = 1.0) -> Plan:
    """Every layer at the same sparsity (one group): the baseline ASAF plans are compared with.

    ``flops`` is the nominal ``dense_flops · (1 − sparsity)``; nothing is predicted (0).
    """
    return Plan((Group(0, num_layers, sparsity),), flops=dense_flops * (1.0 - sparsity), dense_flops=dense_flops,
                predicted_degradation=0.0, max_degradation=0.0, method="uniform")


def render_plan(plan: Plan, table, console: Console) -> None:
    """Print one row per group of ``plan`` (FLOPs and ξ read from the SensitivityTable it was solved
    from) and a one-line summary."""
    level = {float(s): k for k, s in enumerate(table.sparsities)}
    grid = Table(title=f"ASAF plan ({plan.method})")
    for column in ("layers", "n", "sparsity", "FLOPs/token", "saved", "degradation"):
        grid.add_column(column, justify="right")
    for g in plan.groups:
        dense = table.layer_flops[g.start : g.stop].sum()
        k = level.get(g.sparsity)  # None: an unpruned group (solve(..., allow_dense=True))
        flops = dense if k is None else table.flops[g.start, g.length - 1, k]
        xi = 0.0 if k is None else table.degradation[g.start, g.length - 1, k]
        grid.add_row(f"{g.start}–{g.stop - 1}", str(g.length), f"{g.sparsity:.1%}", f"{flops:.4g}",
                     f"{1 - flops / dense:.1%}", f"{xi:.3e}")
    console.print(grid)
    console.print(
        f"{len(plan.groups)} groups over {plan.num_layers} layers · FLOPs saved {1 - plan.flops_ratio:.2%} · "
        f"predicted degradation {plan.predicted_degradation:.4g} of {plan.max_degradation:.4g} · "
        f"solved in {plan.stats.get('time_s', float('nan')) * 1e3:.1f} ms"
    )
