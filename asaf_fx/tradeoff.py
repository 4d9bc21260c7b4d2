"""``asaf_fx.tradeoff_curve``: ASAF and uniform sparsity measured at several budgets from one table.

For each budget δ the run's plan is solved once (each layer pruned at one of the table's levels or
left dense, as ``asaf_fx.run`` solves it, but without its tightening rounds: the curve shows each
plan as solved), compiled and measured on the evaluation windows. Uniform sparsity is measured at
the FLOPs the compiled ASAF model really removes (every layer at ``1 − flops / dense_flops``,
rounded to the granularity like any plan). Each point records, for both, the FLOPs removed, the
weight bytes and the measured degradation (perplexity / the rotated-quantized base's − 1), the
plan's predicted degradation, and ASAF's measured degradation over uniform's.

Measurements are keyed by the MLP channels each decoder layer loses, which is all a compiled model
depends on besides the settings: however many plans come to the same channels (one plan at two
budgets, a uniform plan), the model is compiled and measured once, and the dense model is the base,
never compiled again. OUT/curve.json is rewritten atomically after each measurement; a rerun with
the same settings reuses every measurement in it, so an interrupted curve continues where it
stopped and new budgets cost only their own compiles. OUT/curve.png draws measured degradation
against FLOPs removed (needs matplotlib).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from asaf_fx._atomic import atomic_path, write_text_atomic
from asaf_fx.budget_search import solve_plan
from asaf_fx.calibration.calibrate import fingerprint
from asaf_fx.data import text_sha256
from asaf_fx.inspection import model_totals
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.quantize.reuse import reuse_quantized_weights
from asaf_fx.pipeline import Prepared, RunConfig, fp16_bytes, measure_base, prepare
from asaf_fx.plan import Plan, uniform_plan
from asaf_fx.table import SensitivityTable

CURVE_SCHEMA = "asaf_fx.curve/1"
DEFAULT_BUDGETS = (0.005, 0.01, 0.02, 0.04, 0.08)
PLOT_HINT = "pip install 'asaf-fx[plot]'"
BASE_KEYS = ("ppl_fp", "ppl_base", "dense_flops", "fp16_bytes", "base_bytes")  # measured once, kept in curve.json

Channels = tuple[int, ...]  # MLP channels removed per decoder layer


def budget_list(budgets: Iterable[float]) -> tuple[float, ...]:
    """``budgets`` increasing and without repeats; refused unless each is a positive finite number."""
    try:
        values = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise ValueError(f"budgets must be numbers, e.g. 0.01,0.02 (1 % and 2 %); got {budgets!r}") from None
    if not values:
        raise ValueError("give at least one budget, e.g. 0.01 (a 1 % perplexity rise)")
    bad = [b for b in values if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ValueError(f"every budget must be a positive, finite relative perplexity rise (0.01 = 1 %); got {bad}")
    return tuple(sorted(set(values)))


@dataclass
class CurveResult:
    curve: dict[str, Any]  # what OUT/curve.json holds
    table: SensitivityTable
    png: Path | None  # OUT/curve.png, None without matplotlib

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.curve["points"]


def settings_of(prepared: Prepared) -> dict[str, Any]:
    """Everything a measurement (compiled model → perplexity) depends on besides its channels: the
    table's fingerprint without its levels and metric (they change plans, not measurements), the
    pruning and the evaluation windows. Measurements made under other settings are refused."""
    config = prepared.config
    table_print = fingerprint(prepared.model_name, prepared.model, prepared.text, config.calibration, config.quant)
    settings = {k: v for k, v in table_print.items() if k not in ("sparsities", "metric")}
    settings.update(prune=dataclasses.asdict(prepared.prune), eval_text_sha256=text_sha256(prepared.eval_text),
                    eval_windows=int(prepared.eval_ids.shape[0]), eval_seq_len=config.seq_len)
    return json.loads(json.dumps(settings, sort_keys=True))  # normalise types, as the file reads back


class _Measurements:
    """Compiled models measured so far, by their channels, kept in OUT/curve.json with the points."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.by_channels: dict[Channels, dict[str, Any]] = {}
        self.base: dict[str, Any] | None = None
        if path.is_file():
            self._resume()

    def _resume(self) -> None:
        try:
            body = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path} is not a curve file ({exc}); move it away") from exc
        if not isinstance(body, dict) or body.get("schema") != CURVE_SCHEMA:
            raise ValueError(f"{self.path} is not a curve file of schema {CURVE_SCHEMA}; move it away")
        theirs = body.get("settings", {})
        if theirs != self.settings:
            differing = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} was measured with other settings (differs in: {', '.join(differing)}); "
                             "delete it or choose another output directory")
        self.base = {key: body[key] for key in BASE_KEYS}
        self.by_channels = {tuple(m["channels"]): m for m in body.get("measurements", [])}


def _measured(measurement: dict[str, Any], ppl_base: float) -> dict[str, Any]:
    """One side of a point: what the compiled model removes, weighs and loses."""
    return {"flops_removed": 1.0 - measurement["flops"] / measurement["dense_flops"],
            "weight_bytes": measurement["weight_bytes"], "channels_removed": sum(measurement["channels"]),
            "ppl": measurement["ppl"], "measured_degradation": measurement["ppl"] / ppl_base - 1.0}


def tradeoff_curve(model: str | os.PathLike, out: str | os.PathLike, budgets: Iterable[float] = DEFAULT_BUDGETS,
                   config: RunConfig = RunConfig(), console: Console | None = None) -> CurveResult:
    """Measure the ASAF plan and uniform sparsity at the same FLOPs at each of ``budgets``.

    ``model``, ``out`` and ``config`` are as in ``asaf_fx.run`` (OUT/table.safetensors is reused
    when its settings match, so a curve beside a run costs only its compiles); ``config``'s
    ``max_degradation`` and ``rounds`` are not used: the table reports the entries too noisy for
    the smallest budget. Writes OUT/curve.json (schema ``asaf_fx.curve/1``) and OUT/curve.png.
    Weights quantized from identical inputs are quantized once (``reuse_quantized_weights``).
    """
    with reuse_quantized_weights():
        return _curve(model, out, budget_list(budgets), config, console)


def _curve(model: str | os.PathLike, out: str | os.PathLike, budgets: tuple[float, ...], config: RunConfig,
           console: Console | None) -> CurveResult:
    console = console if console is not None else Console(stderr=True, soft_wrap=True)
    model_name, out = str(model), Path(out)
    config = dataclasses.replace(config, max_degradation=budgets[0])
    prepared = prepare(model_name, out, config, console, models=f"≤ {2 * len(budgets) + 2}")
    config, table = prepared.config, prepared.table
    path = out / "curve.json"
    measurements = _Measurements(path, settings_of(prepared))
    if measurements.base is None:
        measured = measure_base(prepared, console)
        totals = measured.totals
        measurements.base = {"ppl_fp": measured.ppl_fp, "ppl_base": measured.ppl_base,
                             "dense_flops": totals["dense_flops"], "fp16_bytes": fp16_bytes(totals),
                             "base_bytes": int(totals["weight_bytes"])}
    else:
        console.print(f"reusing {len(measurements.by_channels)} measured model(s) and the base's perplexity "
                      f"{measurements.base['ppl_base']:.4f} from {path}")
    base = measurements.base
    num_layers = table.num_layers
    dense: Channels = (0,) * num_layers
    graph = None

    def channels(sparsities: list[float]) -> Channels:
        """The channels compile removes at these per-layer sparsities (prune_mlp's own rounding)."""
        nonlocal graph
        if not any(sparsities):
            return dense
        from asaf_fx.passes.capture import capture
        from asaf_fx.passes.prune.prune_mlp import channels_removed

        graph = graph if graph is not None else capture(prepared.model)
        return tuple(channels_removed(graph, sparsities, prepared.prune.granularity))

    curve = {
        "schema": CURVE_SCHEMA, "model": model_name, "settings": measurements.settings,
        "description": "per budget δ: the ASAF plan solved once within δ (no tightening rounds) and uniform sparsity "
                       "at the FLOPs the compiled plan removes; degradation = perplexity / ppl_base - 1 on the "
                       "evaluation windows",
        **base, "bytes_of": "decoder linear weights (+ their scales)", "z": config.z,
        "table": {"file": "table.safetensors", "sparsities": [float(s) for s in table.sparsities],
                  "mode": table.meta.get("mode"), "health": table.meta.get("health")},
        "eval_text": str(prepared.eval_text), "eval_windows": int(prepared.eval_ids.shape[0]),
        "seq_len": config.seq_len, "calibration_text": str(prepared.text), "quant": config.quant.to_dict(),
        "activation_bits": prepared.activation_bits, "granularity": config.calibration.granularity,
        "budgets": list(budgets), "points": [], "measurements": [],
    }

    def save() -> None:
        curve["measurements"] = sorted(measurements.by_channels.values(), key=lambda m: (sum(m["channels"]),
                                                                                         m["channels"]))
        write_text_atomic(path, json.dumps(curve, indent=2) + "\n")

    def measure(plan: Plan | None, wanted: Channels) -> tuple[dict[str, Any], bool]:
        """The measurement of the model with ``wanted`` channels removed, and whether it is new."""
        if wanted == dense:
            return {"channels": list(dense), "ppl": base["ppl_base"], "flops": base["dense_flops"],
                    "dense_flops": base["dense_flops"], "weight_bytes": base["base_bytes"]}, False
        if wanted in measurements.by_channels:
            return measurements.by_channels[wanted], False
        started = time.perf_counter()
        compiled = prepared.build(plan)
        widths = compiled.graph.meta.get(META_KEY, {}).get("mlp_widths", [])
        got = tuple(w["width"] - w["kept"] for w in widths)
        if got != wanted:
            raise RuntimeError(f"compiling the plan {plan.layer_sparsity} removed channels {got}, not the {wanted} "
                               "that channels_removed gives: the curve's measurement key is out of step with prune_mlp")
        totals = model_totals(compiled)
        measurement = {"channels": list(wanted), "ppl": prepared.perplexity(compiled), "flops": totals["flops"],
                       "dense_flops": totals["dense_flops"], "weight_bytes": int(totals["weight_bytes"]),
                       "time_s": round(time.perf_counter() - started, 1)}
        measurements.by_channels[wanted] = measurement
        save()
        return measurement, True

    save()  # the base, before the first compile
    for budget in budgets:
        plan = solve_plan(table, budget, config.z)
        asaf, new_asaf = measure(plan, channels(list(plan.layer_sparsity)))
        removed = 1.0 - asaf["flops"] / asaf["dense_flops"]
        uniform = uniform_plan(num_layers, removed, table.dense_flops) if removed > 0 else None
        same, new_uniform = measure(uniform, channels([removed] * num_layers) if uniform else dense)
        groups = [[g.start, g.stop, g.sparsity] for g in plan.groups]
        point = {"budget": budget, "groups": groups, "dense": asaf["channels"] == list(dense),
                 "plan_flops_ratio": plan.flops_ratio, "predicted_degradation": plan.predicted_degradation,
                 "asaf": _measured(asaf, base["ppl_base"]),
                 "uniform": {"sparsity": removed, **_measured(same, base["ppl_base"])}}
        mine, theirs = point["asaf"]["measured_degradation"], point["uniform"]["measured_degradation"]
        point["ratio"] = mine / theirs if theirs > 0 else None  # ASAF / uniform, measured
        curve["points"].append(point)
        save()
        reused = "" if new_asaf or new_uniform or point["dense"] else " (measured before)"
        console.print(f"δ={budget:g}: " + ("dense: nothing fits, nothing removed" if point["dense"] else
                      f"{len(plan.groups)} groups, FLOPs −{removed:.2%}, predicted {plan.predicted_degradation:.4g}, "
                      f"measured {mine:.4g}; uniform {theirs:.4g} at FLOPs "
                      f"−{point['uniform']['flops_removed']:.2%}{reused}"))

    png = out / "curve.png"
    if importlib.util.find_spec("matplotlib") is None:
        png = None
        console.print(f"{path} written; curve.png not drawn: matplotlib is missing ({PLOT_HINT})", markup=False)
    else:
        plot(curve, png)
    curve["files"] = {"curve": path.name, "png": png.name if png else None, "table": "table.safetensors"}
    save()
    render(curve, console)
    return CurveResult(curve, table, png)


def render(curve: dict[str, Any], console: Console) -> None:
    """One row per budget: the plan, what it removes and weighs, predicted and measured degradation."""
    grid = Table(title=f"asaf_fx curve: {curve['model']} ({curve['eval_windows']}×{curve['seq_len']} eval tokens, "
                       f"base perplexity {curve['ppl_base']:.4f})")
    for column in ("δ", "groups", "FLOPs removed", "weight bytes", "predicted", "ASAF", "uniform",
                   "uniform FLOPs removed", "ASAF / uniform"):
        grid.add_column(column, justify="right")
    for p in curve["points"]:
        ratio = "—" if p["ratio"] is None else f"{p['ratio']:.2f}"
        grid.add_row(f"{p['budget']:.2%}", "dense" if p["dense"] else str(len(p["groups"])),
                     f"{p['asaf']['flops_removed']:.2%}", f"{p['asaf']['weight_bytes']:,}",
                     f"{p['predicted_degradation']:.2%}", f"{p['asaf']['measured_degradation']:.2%}",
                     f"{p['uniform']['measured_degradation']:.2%}", f"{p['uniform']['flops_removed']:.2%}", ratio)
    console.print(grid)
    if any(p["uniform"]["channels_removed"] == 0 < p["asaf"]["channels_removed"] for p in curve["points"]):
        console.print(f"where uniform removes 0 %, each layer's share rounds to zero blocks of {curve['granularity']} "
                      "channels: that uniform model is the unpruned base")
    console.print(f"degradation = perplexity / {curve['ppl_base']:.4f} (rotated-quantized, unpruned) − 1; "
                  f"weight bytes of the decoder linears (base {curve['base_bytes']:,}, 16-bit {curve['fp16_bytes']:,})")


def plot(curve: dict[str, Any], path: Path) -> None:
    """Measured degradation against FLOPs removed, ASAF and uniform; ASAF's predictions hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for side, marker, color, label in (("asaf", "o", "C0", "ASAF, measured"), ("uniform", "s", "C1",
                                                                                 "uniform, measured")):
        xy = sorted((100 * p[side]["flops_removed"], 100 * p[side]["measured_degradation"]) for p in points)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=marker, color=color, label=label)
    ax.scatter([100 * p["asaf"]["flops_removed"] for p in points], [100 * p["predicted_degradation"] for p in points],
               marker="o", s=60, facecolors="none", edgecolors="C0", label="ASAF, predicted")
    for p in points:
        ax.annotate(f"δ={100 * p['budget']:.3g}%", (100 * p["asaf"]["flops_removed"],
                                                  100 * p["asaf"]["measured_degradation"]),
                    textcoords="offset points", xytext=(5, -12), fontsize=8, color="C0")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("FLOPs removed (% of the decoder linears')")
    ax.set_ylabel("measured degradation (% perplexity rise over the base)")
    ax.set_title(f"{Path(curve['model']).name}: ASAF vs uniform sparsity at the same FLOPs")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
