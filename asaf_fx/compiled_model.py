"""``CompiledModel``: the module ``asaf_fx.compile`` returns — one graph that scores, prefills and decodes."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.fx import GraphModule
from transformers.modeling_outputs import CausalLMOutputWithPast

from asaf_fx.config import QuantConfig
from asaf_fx.passes.capture import cache_dtype, graph_inputs, new_cache, token_positions
from asaf_fx.passes.infra import META_KEY
from asaf_fx.sampling import Sampling

log = logging.getLogger(__name__)


class CompiledModel(torch.nn.Module):
    """The rewritten graph of one causal LM (``asaf_fx.passes.capture`` gives its inputs).

    ``forward(input_ids, attention_mask=None)`` scores whole sequences (left padding allowed) and
    returns an output with ``.logits``. ``generate`` prefills each prompt into the KV cache in one
    call and then decodes one token per step, for up to ``max_batch`` rows of any lengths (left
    padded, with ``attention_mask``), greedily or by sampling. On a CUDA device the graph goes
    through ``torch.compile`` (prefill with dynamic lengths) and each decode step replays a CUDA
    graph captured once per batch size over a cache allocated once (``max_batch`` rows of
    ``max_cache_len`` slots); on the CPU the graph runs eagerly on a cache of exactly the slots
    each call needs.
    """

    def __init__(self, graph: GraphModule, config, quant: QuantConfig, plan=None, max_batch: int = 1,
                 max_cache_len: int | None = None, eos_token_id: int | Iterable[int] | None = None,
                 backend: str | None = "auto") -> None:
        super().__init__()
        context = getattr(config, "max_position_embeddings", None)
        max_cache_len = max_cache_len or context or 2048
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_cache_len < 1 or (context is not None and max_cache_len > context):
            raise ValueError(f"max_cache_len must be between 1 and the model's context of {context} positions, "
                             f"got {max_cache_len}")
        self.graph = graph
        self.config = config
        self.quant = quant
        self.plan = plan
        self.max_batch = int(max_batch)
        self.max_cache_len = int(max_cache_len)
        self.backend = _resolve_backend(backend, graph)
        # torch.compile only traces and lowers the graph: every weight transform already happened.
        # A tuple, so nn.Module does not register the (possibly wrapped) graph a second time.
        self._runners = (self._compiled(dynamic=True), self._compiled(dynamic=False))
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(e) for e in eos]
        self._static: _StaticCache | None = None  # CUDA: the cache and the decode graphs, made on first use

    def train(self, mode: bool = True) -> CompiledModel:
        """Only records the flag: the graph is inference-only (exported modules refuse ``train``)."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.graph.buffers()), next(self.graph.parameters())).device

    @property
    def cache_dtype(self) -> torch.dtype:
        return cache_dtype(self.graph)

    def _compiled(self, dynamic: bool):
        return self.graph if self.backend is None else torch.compile(self.graph, backend=self.backend, dynamic=dynamic)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """Logits of whole sequences; ``attention_mask`` (B, T) marks real tokens (left padding: 0s first)."""
        _check_ids(input_ids, attention_mask)
        with torch.no_grad():
            logits = self._runners[0](*graph_inputs(self.graph, input_ids, attention_mask))
        return CausalLMOutputWithPast(logits=logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, eos_token_id: int | Iterable[int] | None = None,
                 pad_token_id: int | None = None, streamer=None, stopping_criteria=None) -> torch.Tensor:
        """Prompt + new tokens (B, T + n), as transformers' ``generate`` returns them.

        Rows of different lengths come left padded with ``attention_mask`` (the transformers
        convention); each row gives what it gives alone. ``do_sample`` draws each token after
        ``temperature``, ``top_k`` and ``top_p`` from torch's global generator (seed it with
        ``torch.manual_seed``). A row ends at an EOS token (``eos_token_id``, default the model's)
        and is padded with ``pad_token_id`` (default the first EOS id) until every row has ended.
        ``streamer``: any object with ``put(ids)`` and ``end()``, e.g. transformers' ``TextStreamer``
        or ``TextIteratorStreamer`` (an iterator); it gets the prompt, then each step's tokens (B,).
        ``stopping_criteria``: transformers' ``StoppingCriteriaList`` or any callable
        ``(ids so far, None) -> bool (B,)`` that ends the rows it marks, as an EOS token would.
        """
        _check_ids(input_ids, attention_mask)
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        batch, prompt = input_ids.shape
        if batch > self.max_batch:
            raise ValueError(f"generate got {batch} rows; this model takes at most max_batch={self.max_batch} "
                             f"(compile with max_batch={batch})")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        slots = prompt + max_new_tokens
        if slots > self.max_cache_len:
            raise ValueError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the KV cache of "
                             f"{self.max_cache_len} positions; compile or load with a larger max_cache_len")
        eos = self.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        device = input_ids.device
        real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        session = self._session(batch, slots, device)
        session.mask[:, :prompt] = real
        session.mask[:, prompt:] = True
        positions = token_positions(real)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with torch.no_grad():  # the prefill: the whole prompt into the cache, logits of its last position
            logits = session.run(input_ids, positions, torch.arange(prompt, device=device), prompt)
            tokens, done = [input_ids], torch.zeros(batch, dtype=torch.bool, device=device)
            eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
            position = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                nxt = sampling.next_tokens(logits[:, -1])
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                tokens.append(nxt[:, None])
                if streamer is not None:
                    streamer.put(nxt.cpu())
                done |= torch.isin(nxt, eos_ids)
                if stopping_criteria is not None:
                    done |= torch.as_tensor(stopping_criteria(torch.cat(tokens, dim=1), None), device=device)
                if step + 1 == max_new_tokens or bool(done.all()):
                    break
                logits = session.step(nxt[:, None], position + step, prompt + step)
        if streamer is not None:
            streamer.end()
        return torch.cat(tokens, dim=1)

    def decode_steps(self, batch: int, slots: int | None = None):
        """``step(token (batch, 1), position) -> logits (batch, 1, V)`` over a fresh cache of ``slots``
        positions (default ``max_cache_len``), every slot a real token: decode alone, as benchmarks
        time it. Each step writes its K/V at ``position``; steps go in increasing positions."""
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch={self.max_batch}; compile with max_batch={batch}")
        slots = slots or self.max_cache_len
        session = self._session(batch, slots, self.device)
        session.mask[:, :slots] = True
        return lambda token, position: session.step(
            token, torch.full((batch, 1), int(position), dtype=torch.long, device=token.device), int(position))

    def _session(self, batch: int, slots: int, device: torch.device) -> _Session:
        layout = self.graph.meta[META_KEY]["cache"]
        if device.type != "cuda" or self.backend is None:
            return _Session(self._runners[0], new_cache(layout, batch, slots, self.cache_dtype, device),
                            torch.zeros(batch, slots, dtype=torch.bool, device=device), trim=True)
        if self._static is None:
            self._static = _StaticCache(new_cache(layout, self.max_batch, self.max_cache_len, self.cache_dtype, device),
                                        self.max_batch, self.max_cache_len, device)
        return self._static.session(self._runners, batch)


class _Session:
    """One generate call's cache and slot mask, and how to run the graph over them.

    ``trim``: hand the graph only the slots filled so far (eager: attention over the prompt and
    the tokens made, not the whole cache); otherwise always the whole cache (static shapes).
    """

    def __init__(self, run, cache: list[torch.Tensor], mask: torch.Tensor, trim: bool) -> None:
        self._run, self.cache, self.mask, self.trim = run, cache, mask, trim

    def _inputs(self, used: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self.trim:
            return self.cache, self.mask
        return [c[:, :, :used] for c in self.cache], self.mask[:, :used]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor, used: int) -> torch.Tensor:
        """Logits (B, 1, V) of the last of ``ids``' T tokens, written to the cache at ``cache_position``."""
        cache, mask = self._inputs(used)
        last = torch.tensor([ids.shape[1] - 1], device=ids.device)  # the lm_head runs on one row
        return self._run(ids, positions, cache_position, mask, last, *cache)

    def step(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits (B, 1, V) of one token per row at cache ``slot``."""
        return self.run(token, position, torch.tensor([slot], device=token.device), slot + 1)


class _StaticCache:
    """CUDA: one cache of ``max_batch`` rows for every call, and a decode CUDA graph per batch size."""

    def __init__(self, cache: list[torch.Tensor], max_batch: int, slots: int, device: torch.device) -> None:
        self.cache, self.device = cache, device
        self.mask = torch.zeros(max_batch, slots, dtype=torch.bool, device=device)
        self.steps: dict[int, _DecodeGraph] = {}

    def session(self, runners, batch: int) -> _Session:
        cache = [c[:batch] for c in self.cache]  # leading rows: contiguous, fixed addresses
        session = _Session(runners[0], cache, self.mask[:batch], trim=False)
        step = self.steps.get(batch)
        if step is None:
            step = self.steps[batch] = _DecodeGraph(runners[1], cache, self.mask[:batch], batch, self.device)
        session.step = step  # decode steps replay the captured graph
        return session


class _DecodeGraph:
    """Static inputs of a one-token step and, once warmed up, the CUDA graph of one step over them.

    The position lives in a device tensor updated in place, so a step launches nothing from Python
    and never waits for the host. A graph that cannot be captured runs launch by launch instead.
    """

    def __init__(self, run, cache: list[torch.Tensor], mask: torch.Tensor, batch: int, device: torch.device) -> None:
        self._call = lambda: run(self.ids, self.pos, self.slot, mask, self.first, *cache)
        self.first = torch.zeros(1, dtype=torch.long, device=device)  # the one token's logits
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.failed = False

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        self.ids.copy_(token)
        self.pos.copy_(position)
        self.slot.fill_(slot)  # a kernel argument, not a host-to-device copy: no sync
        if self.graph is None and not self.failed:
            self._capture()  # its warm-up runs this step; the replay below rewrites the same slot
        if self.graph is None:
            return self._call()
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles, autotunes, allocates
                    self._call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._call()
        except RuntimeError as exc:
            log.warning("decode step not captured as a CUDA graph (%s); it runs launch by launch", exc)
            torch.cuda.synchronize()
            self.failed, self.logits = True, None
            return
        self.graph = graph


def _check_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a 2-D LongTensor (batch, seq), got {getattr(input_ids, 'dtype', None)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens; pass at least one token per row")
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding: each row's 0s (padding) before its 1s, and its last "
                         "token real; pad on the left (tokenizer.padding_side = 'left')")


def _resolve_backend(backend: str | None, gm: GraphModule) -> str | None:
    """"auto": inductor when the weights live on a CUDA device, eager (None) otherwise."""
    if backend != "auto":
        return backend
    device = next((t.device for t in gm.buffers()), None) or next((t.device for t in gm.parameters()), None)
    return "inductor" if device is not None and device.type == "cuda" else None
