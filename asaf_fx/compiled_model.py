"""``CompiledModel``: the module ``asaf_fx.compile`` returns — a forward graph and a decode graph."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.fx import GraphModule
from transformers.modeling_outputs import CausalLMOutputWithPast

from asaf_fx.config import QuantConfig

log = logging.getLogger(__name__)


class CompiledModel(torch.nn.Module):
    """Rewritten graphs of one causal LM.

    ``forward(input_ids)`` runs the full-sequence graph (any batch and length) and returns an
    output with ``.logits``; ``generate(input_ids, max_new_tokens)`` decodes greedily, one token
    per step, through the static-KV-cache graph (``decode_batch`` rows, prompt + new tokens ≤
    ``max_cache_len``). On a CUDA device each decode step replays one CUDA graph: the position
    lives in a device tensor updated in place, so a step launches no kernel from Python and never
    waits for the host.
    """

    def __init__(self, forward_graph: GraphModule, decode_graph: GraphModule | None, config,
                 quant: QuantConfig, plan=None, eos_token_id: int | Iterable[int] | None = None,
                 backend: str | None = "auto") -> None:
        super().__init__()
        self.forward_graph = forward_graph
        self.decode_graph = decode_graph
        self.config = config
        self.quant = quant
        self.plan = plan
        self.backend = _resolve_backend(backend, forward_graph)
        # torch.compile only traces and lowers the graphs: every weight transform already happened.
        # A tuple, so nn.Module does not register the (possibly wrapped) graphs a second time.
        self._runners = (self._compiled(forward_graph, dynamic=True),
                         None if decode_graph is None else self._compiled(decode_graph, dynamic=False))
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(e) for e in eos]
        self._step = None  # the decode step's static buffers and CUDA graph, made on first use

    def train(self, mode: bool = True) -> CompiledModel:
        """Only records the flag: the graphs are inference-only (exported modules refuse ``train``)."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.forward_graph.buffers()), next(self.forward_graph.parameters())).device

    def _compiled(self, gm: GraphModule, dynamic: bool):
        return gm if self.backend is None else torch.compile(gm, backend=self.backend, dynamic=dynamic)

    @property
    def max_cache_len(self) -> int | None:
        return None if self.decode_graph is None else self.decode_graph.meta["max_cache_len"]

    @property
    def decode_batch(self) -> int | None:
        """Rows of every decode step (the static cache's batch); None without a decode graph."""
        return None if self.decode_graph is None else self.decode_graph.meta.get("decode_batch", 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks are not supported yet; pass equal-length rows without a mask")
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 2-D LongTensor (batch, seq), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        with torch.no_grad():
            out = self._runners[0](input_ids, use_cache=False)
        return CausalLMOutputWithPast(logits=out.logits)

    def decode_step(self, token: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) for ``token`` (B, 1) at cache ``position``; writes its K/V to the cache.

        ``position`` is an int or a one-element device tensor; B is ``decode_batch``. Repeating a
        step (same token, same position) rewrites the same cache slot with the same values.
        """
        if self.decode_graph is None:
            raise RuntimeError("this model was compiled without a decode graph (decode=False)")
        if token.dim() != 2 or token.shape != (self.decode_batch, 1):
            raise ValueError(f"decode_step takes token ids of shape ({self.decode_batch}, 1) (decode_batch rows), "
                             f"got {tuple(token.shape)}; compile with decode_batch={token.shape[0]} for other batches")
        first = self._step is None
        step = self._step = self._step or _DecodeStep(torch.zeros_like(token),
                                                      torch.zeros(1, dtype=torch.long, device=token.device))
        step.ids.copy_(token)
        if isinstance(position, torch.Tensor):
            step.pos.copy_(position.reshape(1))
        else:
            step.pos.fill_(position)  # a kernel argument, not a host-to-device copy: no sync
        if first and token.is_cuda:
            step.capture(lambda: self._runners[1](input_ids=step.ids, cache_position=step.pos))
        if step.graph is not None:
            step.graph.replay()
            return step.logits.clone()  # the graph's output buffer is overwritten by the next replay
        with torch.no_grad():
            return self._runners[1](input_ids=step.ids, cache_position=step.pos)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 eos_token_id: int | Iterable[int] | None = None) -> torch.Tensor:
        """Greedy decoding; returns prompt + new tokens, stopping after an EOS token.

        ``eos_token_id`` defaults to the model's generation config (as transformers does).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.decode_batch:
            raise ValueError(f"generate decodes {self.decode_batch} sequence(s) of equal length at a time "
                             f"(decode_batch); got input_ids of shape {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if self.max_cache_len is not None and total > self.max_cache_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the static "
                             f"cache of {self.max_cache_len} positions; compile with a larger max_cache_len")
        eos = self.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        tokens = input_ids.clone()
        logits = None
        for i in range(input_ids.shape[1]):  # prefill one token at a time (the graph has seq length 1)
            logits = self.decode_step(tokens[:, i:i + 1], i)
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            done |= torch.isin(nxt[:, 0], eos_ids)
            if bool(done.all()):  # every row has ended (one row: its EOS token)
                break
            logits = self.decode_step(nxt, tokens.shape[1] - 1)
        return tokens


class _DecodeStep:
    """Static inputs of the decode graph and, on CUDA, the graph of one step captured over them."""

    def __init__(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.ids, self.pos = ids, pos
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def capture(self, run) -> None:
        """Warm ``run`` up on a side stream (compiles, autotunes, allocates), then capture one call.

        The warm-up calls run the first real step (its token, its position): the replay that
        follows writes the same cache slot with the same values.
        A graph that cannot be captured (an op that syncs with the host) runs uncaptured instead.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.no_grad():
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.logits = run()
        except RuntimeError as exc:
            log.warning("decode step not captured as a CUDA graph (%s); it runs launch by launch", exc)
            torch.cuda.synchronize()
            self.graph, self.logits = None, None
            return
        self.graph = graph


def _resolve_backend(backend: str | None, gm: GraphModule) -> str | None:
    """"auto": inductor when the weights live on a CUDA device, eager (None) otherwise."""
    if backend != "auto":
        return backend
    device = next((t.device for t in gm.buffers()), None) or next((t.device for t in gm.parameters()), None)
    return "inductor" if device is not None and device.type == "cuda" else None
