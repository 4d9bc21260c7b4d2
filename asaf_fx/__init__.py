"""asaf-fx: rotation-based low-bit quantization plus sensitivity-aware structured sparsity."""

from asaf_fx.calibration.calibrate import CalibrationConfig, calibrate
from asaf_fx.checkpoint import CheckpointError, CheckpointInfo, load, save
from asaf_fx.compile import compile  # noqa: A004 (public name from the design card)
from asaf_fx.config import PruneConfig, QuantConfig
from asaf_fx.inspection import inspect
from asaf_fx.models import load_model
from asaf_fx.pipeline import RunConfig, RunResult, run
from asaf_fx.plan import Group, Plan, uniform_plan
from asaf_fx.solvers import InfeasibleError, solve
from asaf_fx.table import SensitivityTable
from asaf_fx.tradeoff import CurveResult, tradeoff_curve

__version__ = "0.1.0.dev0"

__all__ = ["CalibrationConfig", "CheckpointError", "CheckpointInfo", "CurveResult", "Group", "InfeasibleError", "Plan",
           "PruneConfig", "QuantConfig", "RunConfig", "RunResult", "SensitivityTable", "calibrate", "compile",
           "inspect", "load", "load_model", "run", "save", "solve", "tradeoff_curve", "uniform_plan"]
