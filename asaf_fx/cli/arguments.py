"""Argument types and helpers shared by the command-line tools."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from asaf_fx._atomic import write_text_atomic
from asaf_fx.calibration.calibrate import FIT_WINDOWS, CalibrationConfig
from asaf_fx.calibration.entries import MODES
from asaf_fx.config import CLIP_SEARCH, QuantConfig
from asaf_fx.passes.quantize.quantize_weights import WEIGHT_METHODS
from asaf_fx.pipeline import DEFAULT_EVAL_WINDOWS, RUN_SPARSITIES, RunConfig, default_quant


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``low``, refused with a message naming the value otherwise."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{number} is below {low}")
        return number

    return parse


def emit_report(report: dict[str, Any], out: Path | None, render: Callable[[dict[str, Any], Console], None],
                console: Console) -> None:
    """JSON to stdout (and atomically to ``out``), the human-readable rendering to ``console``."""
    text = json.dumps(report, indent=2)
    if out is not None:
        write_text_atomic(out, text + "\n")
    render(report, console)
    sys.stdout.write(text + "\n")


def sparsity_list(value: str) -> tuple[float, ...]:
    """argparse type: comma-separated sparsity levels in (0, 1), strictly increasing."""
    try:
        levels = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers") from None
    if not levels:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 0.05,0.1")
    if any(not 0 < s < 1 for s in levels):
        raise argparse.ArgumentTypeError(f"every sparsity must lie in (0, 1); got {list(levels)}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise argparse.ArgumentTypeError(f"sparsities must be strictly increasing; got {list(levels)}")
    return levels


def clip_ratio(value: str) -> float | str:
    """argparse type of --a-clip: a ratio, or CLIP_SEARCH."""
    if value == CLIP_SEARCH:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--a-clip must be a number in (0, 1] or {CLIP_SEARCH!r}, got {value!r}"
        ) from None


def overrides_json(value: str) -> dict[str, Any]:
    """argparse type of --overrides: a JSON object, weight-name pattern -> settings."""
    try:
        overrides = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--overrides is not valid JSON ({exc}); write e.g. "
                                         '\'{"*.down_proj.weight": {"a_bits": 8}}\'') from None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError("--overrides must be a JSON object: weight-name pattern -> settings")
    return overrides


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """--w-bits, --a-bits, --kv-bits, --w-method, --group-size, --a-clip, --overrides (the main job's
    quantization, ``pipeline.default_quant()``, by default)."""
    default = default_quant()
    parser.add_argument("--w-bits", type=int, default=default.w_bits, help=f"default {default.w_bits}")
    parser.add_argument("--a-bits", type=int, default=default.a_bits, help=f"default {default.a_bits}")
    parser.add_argument("--kv-bits", type=int, default=default.kv_bits, help=f"default {default.kv_bits}")
    parser.add_argument("--w-method", choices=tuple(WEIGHT_METHODS), default=default.w_method)
    parser.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    parser.add_argument("--a-clip", type=clip_ratio, default=default.a_clip,
                        help=f"activation clip ratio in (0, 1], or 'mse' to choose one per linear on the "
                             f"calibration data (default {default.a_clip:g})")
    parser.add_argument("--overrides", type=overrides_json, default={},
                        help='per-linear settings by weight-name pattern, as JSON, e.g. '
                             '\'{"*.down_proj.weight": {"a_bits": 8}}\' (QuantConfig.overrides)')


def quant_config(args: argparse.Namespace, rotate: bool = True) -> QuantConfig:
    """The QuantConfig the options of :func:`add_quant_arguments` (and --seed) describe."""
    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, w_method=args.w_method,
                       w_group_size=args.group_size, a_clip=args.a_clip, rotate=rotate, seed=args.seed,
                       overrides=args.overrides)


NO_REFIT_HELP = ("keep the kept down_proj columns as they are instead of refitting them to the removed "
                 "channels' contribution (PruneConfig.refit)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --out of the commands that run the pipeline (``run``, ``curve``)."""
    parser.add_argument("--model", required=True, help="'smollm2', a transformers model directory or a .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The texts, windows, table levels, quantization, 8-bit layers, granularity, seed and z of a
    :class:`RunConfig` (``run``, ``curve``); :func:`run_config` reads them back."""
    parser.add_argument("--text", type=Path, help="calibration text; default: the WikiText-2 validation split")
    parser.add_argument("--eval-text", type=Path, help="evaluation text; default: the WikiText-2 test split")
    parser.add_argument("--eval-windows", type=int_at_least(0), default=DEFAULT_EVAL_WINDOWS,
                        help=f"evaluation windows from the start of --eval-text (run: and as many check windows "
                        f"of --text outside the calibration windows); 0: every whole window, which takes longer "
                        f"(default {DEFAULT_EVAL_WINDOWS})")
    parser.add_argument("--seq-len", type=int_at_least(1), default=2048, help="evaluation window tokens (default 2048)")
    parser.add_argument("--windows", type=int_at_least(1), default=8,
                        help="held-out calibration windows each table entry is measured on (default 8)")
    parser.add_argument("--fit-windows", type=int_at_least(1), default=FIT_WINDOWS,
                        help="other calibration windows, which fit GPTQ, the channel choice and the refit "
                             f"(default {FIT_WINDOWS})")
    parser.add_argument("--cal-seq-len", type=int_at_least(1), default=256,
                        help="calibration window tokens (default 256)")
    parser.add_argument("--sparsities", type=sparsity_list, default=RUN_SPARSITIES,
                        help=f"table levels, comma-separated, increasing (default "
                             f"{','.join(map(str, RUN_SPARSITIES))})")
    parser.add_argument("--mode", choices=MODES, default="per-layer", help="calibration mode (default per-layer)")
    parser.add_argument("--max-length", type=int_at_least(1), help="longest measured group in --mode groups")
    add_quant_arguments(parser)
    parser.add_argument("--a8-layers", type=int_at_least(0), default=0, metavar="K",
                        help="raise the inputs of the K decoder layers that gain most from it (each layer measured "
                             "on calibration text) from 4 to 8 bits, with --a-bits 4; 0: none (default)")
    parser.add_argument("--granularity", type=int_at_least(1), default=32, help="channels removed per block "
                                                                                "(default 32)")
    parser.add_argument("--no-refit", action="store_true", help=NO_REFIT_HELP)
    parser.add_argument("--seed", type=int, default=0, help="window choice and rotations (default 0)")
    parser.add_argument("--z", type=float, default=1.0,
                        help="standard errors charged on top of each table entry's ξ (default 1)")


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace, **fields: Any) -> RunConfig:
    """The RunConfig of :func:`add_pipeline_arguments`' options and ``fields`` (e.g. max_degradation);
    an invalid combination is reported by ``parser.error``, naming the option."""
    if (args.mode == "groups") != (args.max_length is not None):
        parser.error("--max-length k goes with --mode groups, and --mode groups needs it")
    try:
        calibration = CalibrationConfig(mode=args.mode, max_length=args.max_length, sparsities=args.sparsities,
                                        windows=args.windows, fit_windows=args.fit_windows, seq_len=args.cal_seq_len,
                                        seed=args.seed, metric="ppl", granularity=args.granularity,
                                        refit=not args.no_refit)
        return RunConfig(text=args.text, eval_text=args.eval_text, eval_windows=args.eval_windows,
                         seq_len=args.seq_len, a8_layers=args.a8_layers, z=args.z, quant=quant_config(args),
                         calibration=calibration, **fields)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc).replace("max_degradation", "--max-degradation"))


def run_cli(run: Callable[[], Any], console: Console, interrupted: str) -> int:
    """Call ``run``; bad input (missing file, invalid value) prints one line and returns 2."""
    try:
        run()
    except KeyboardInterrupt:
        console.print(f"interrupted: {interrupted}", soft_wrap=True)
        return 130
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"error: {exc}", soft_wrap=True, markup=False, highlight=False)
        return 2
    return 0
