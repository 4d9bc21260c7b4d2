"""asaf-fx: rotation-based low-bit quantization plus sensitivity-aware structured sparsity."""

from asaf_fx.solvers import InfeasibleError, solve
from asaf_fx.sparsity_plan import Group, Plan
from asaf_fx.table import SensitivityTable

__version__ = "0.1.0.dev0"

__all__ = ["Group", "InfeasibleError", "Plan", "SensitivityTable", "solve"]
