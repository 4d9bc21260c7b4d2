"""ξ: how much pruning some layers degrades the quantized model on calibration windows.

Metrics (the table records which; the solver's budget is in the same unit):

* ``ppl``: relative perplexity increase, ``exp((NLL_pruned − NLL_base) / tokens) − 1``;
* ``kl``: mean per-token KL(base ‖ pruned) of the next-token distributions, lower-variance. It
  keeps the base model's log-probabilities: tokens × vocabulary floats in memory.

Each value comes with its standard error, from the paired per-token differences against the
unpruned model on the same tokens (NLL difference for ``ppl``, the KL itself for ``kl``) summed in
blocks of ``BLOCK_TOKENS`` consecutive tokens of a window: the batch-means error of their mean,
``√(B/(B−1)·Σ_b (S_b − D·n_b)²) / T`` over B blocks, times ``e^D`` for ``ppl`` (delta method).
Blocks rather than single tokens, because neighbouring tokens' differences are correlated.

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
BLOCK_TOKENS = 128


def block_sums(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and token counts of consecutive blocks of ``BLOCK_TOKENS`` in each row of (rows, tokens)."""
    rows, tokens = per_token.shape
    count = -(-tokens // BLOCK_TOKENS)
    padded = F.pad(per_token.to(torch.float64), (0, count * BLOCK_TOKENS - tokens))
    sums = padded.reshape(rows, count, BLOCK_TOKENS).sum(-1).flatten()
    sizes = torch.full((count,), float(BLOCK_TOKENS), dtype=torch.float64)
    sizes[-1] = tokens - (count - 1) * BLOCK_TOKENS
    return sums, sizes.repeat(rows)


def mean_stderr(sums: torch.Tensor, sizes: torch.Tensor) -> float:
    """Standard error of ``sums.sum() / sizes.sum()`` from its blocks (NaN with fewer than two)."""
    blocks = sums.numel()
    if blocks < 2:
        return math.nan
    total = float(sizes.sum())
    mean = float(sums.sum()) / total
    return math.sqrt(blocks / (blocks - 1) * float(((sums - mean * sizes) ** 2).sum())) / total


class DegradationMeter:
    def __init__(self, model: CalibrationModel, batches: list[torch.Tensor], metric: str = "ppl") -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown degradation metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.model = model
        self.batches = batches
        self.metric = metric
        self.layer_forwards = 0
        runner = model.runner
        states = [runner.start_tokens(batch) for batch in batches]
        self._inputs = []
        for layer in range(runner.num_layers):
            self._inputs.append(states)
            states = [runner.run_layer(layer, state) for state in states]
        self.tokens = sum(batch[:, 1:].numel() for batch in batches)
        self._base_logprobs = []
        self._base_token_nll = []
        self._base_nll = 0.0
        for batch, state in zip(batches, states, strict=True):
            logits = self._logits(state)
            self._base_nll += self._nll(logits, batch)
            self._base_token_nll.append(self._token_nll(logits, batch))
            if metric == "kl":
                self._base_logprobs.append(F.log_softmax(logits[:, :-1], dim=-1))

    def _logits(self, state) -> torch.Tensor:
        return self.model.runner.finish(state).float()

    @staticmethod
    def _nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum"))

    @staticmethod
    def _token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        # Rows of the vocabulary contiguous: the (N, C, L) layout is 3× slower on the CPU.
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="none").view(batch.shape[0], -1)

    def __call__(self, assignment: dict[int, int]) -> float:
        """ξ with layer i pruned at level ``assignment[i]`` for each key, the rest unpruned."""
        return self.measure(assignment)[0]

    def measure(self, assignment: dict[int, int]) -> tuple[float, float]:
        """(ξ, its standard error) with layer i pruned at level ``assignment[i]``, the rest unpruned."""
        if not assignment:
            return 0.0, 0.0
        variants = {layer: self.model.variant(layer, level) for layer, level in assignment.items()}
        runner = self.model.runner
        return self._measure(min(assignment), lambda layer, state: runner.run_layer(layer, state,
                                                                                    replace=variants.get(layer)))

    def degradation(self, first: int, run_layer: Callable[[int, State], State]) -> float:
        """ξ of a model that runs layer i as ``run_layer(i, state)`` for i ≥ ``first``; layers
        before ``first`` must be the base model's (their outputs are reused)."""
        return self._measure(first, run_layer)[0]

    def _measure(self, first: int, run_layer: Callable[[int, State], State]) -> tuple[float, float]:
        nll, kl = 0.0, 0.0
        sums, sizes = [], []
        for index, batch in enumerate(self.batches):
            state = self._inputs[first][index]
            for layer in range(first, self.model.num_layers):
                state = run_layer(layer, state)
                self.layer_forwards += 1
            logits = self._logits(state)
            if self.metric == "kl":
                logprobs = F.log_softmax(logits[:, :-1], dim=-1)
                base = self._base_logprobs[index]
                terms = base.exp() * (base - logprobs)
                kl += float(terms.sum())
                per_token = terms.sum(-1)
            else:
                # ξ from the summed loss as before (its bits, and so tables, unchanged); the per-token
                # losses, a second pass over the logits, only feed the error.
                nll += self._nll(logits, batch)
                per_token = self._token_nll(logits, batch).double() - self._base_token_nll[index].double()
            block, size = block_sums(per_token)
            sums.append(block)
            sizes.append(size)
        stderr = mean_stderr(torch.cat(sums), torch.cat(sizes))
        if self.metric == "kl":
            return kl / self.tokens, stderr
        mean = (nll - self._base_nll) / self.tokens
        return math.expm1(mean), math.exp(mean) * stderr
