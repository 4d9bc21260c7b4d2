"""ξ: how much pruning some layers degrades the quantized model on calibration windows.

Metrics (the table records which; the solver's budget is in the same unit):

* ``ppl``: relative perplexity increase, ``exp((NLL_pruned − NLL_base) / tokens) − 1``;
* ``kl``: mean per-token KL(base ‖ pruned) of the next-token distributions, lower-variance. It
  keeps the base model's log-probabilities: tokens × vocabulary floats in memory.

The unpruned model's input to every layer is computed once and kept, so a measurement whose first
pruned layer is i runs layers i..p−1 only; ``layer_forwards`` counts the decoder-layer runs (per
calibration batch) a measurement costs, which is what the calibration's time is made of.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from asaf_fx.calibration.variants import CalibrationModel
from asaf_fx.passes.layerwise import State

METRICS = ("ppl", "kl")


class DegradationMeter:
    def __init__(self, model: CalibrationModel, batches: list[torch.Tensor], metric: str = "ppl") -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown degradation metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.model = model
        self.batches = batches
        self.metric = metric
        self.layer_forwards = 0
        runner = model.runner
        states = [runner.start(batch, False) for batch in batches]
        self._inputs = []
        for layer in range(runner.num_layers):
            self._inputs.append(states)
            states = [runner.run_layer(layer, state) for state in states]
        self.tokens = sum(batch[:, 1:].numel() for batch in batches)
        self._base_logprobs = []
        self._base_nll = 0.0
        for batch, state in zip(batches, states, strict=True):
            logits = self._logits(state)
            self._base_nll += self._nll(logits, batch)
            if metric == "kl":
                self._base_logprobs.append(F.log_softmax(logits[:, :-1], dim=-1))

    def _logits(self, state) -> torch.Tensor:
        return self.model.runner.finish(state)[0].float()

    @staticmethod
    def _nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum"))

    def __call__(self, assignment: dict[int, int]) -> float:
        """ξ with layer i pruned at level ``assignment[i]`` for each key, the rest unpruned."""
        if not assignment:
            return 0.0
        variants = {layer: self.model.variant(layer, level) for layer, level in assignment.items()}
        runner = self.model.runner
        return self.degradation(min(assignment), lambda layer, state: runner.run_layer(layer, state,
                                                                                       replace=variants.get(layer)))

    def degradation(self, first: int, run_layer: Callable[[int, State], State]) -> float:
        """ξ of a model that runs layer i as ``run_layer(i, state)`` for i ≥ ``first``; layers
        before ``first`` must be the base model's (their outputs are reused)."""
        nll, kl = 0.0, 0.0
        for index, batch in enumerate(self.batches):
            state = self._inputs[first][index]
            for layer in range(first, self.model.num_layers):
                state = run_layer(layer, state)
                self.layer_forwards += 1
            logits = self._logits(state)
            if self.metric == "kl":
                logprobs = F.log_softmax(logits[:, :-1], dim=-1)
                base = self._base_logprobs[index]
                kl += float((base.exp() * (base - logprobs)).sum())
            else:
                nll += self._nll(logits, batch)
        if self.metric == "kl":
            return kl / self.tokens
        return math.expm1((nll - self._base_nll) / self.tokens)
