"""``QuantConfig`` and ``PruneConfig``: how ``asaf_fx.compile`` transforms a model (torchao-style frozen configs)."""

from __future__ import annotations

import difflib
import fnmatch
import glob
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from asaf_fx.passes.quantize.quantize_weights import WEIGHT_METHODS, LinearQuant

_BITS = (4, 8, 16)
_ROTATIONS = ("hadamard", "orthogonal")
CLIP_SEARCH = "mse"
# What a per-linear override may change: the settings that belong to one linear.
OVERRIDABLE = ("w_bits", "a_bits", "w_group_size", "a_clip", "w_method")


def _check_bits(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or value not in _BITS:
        raise ValueError(f"{owner}.{name}={value!r}: must be one of {_BITS}")


def _check_group_size(owner: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 64):
        raise ValueError(f"{owner}.w_group_size={value!r}: must be None (per output channel) or a positive "
                         "multiple of 64 (what the INT4 kernels support), e.g. 128")


def _check_clip(owner: str, value: object) -> None:
    if value == CLIP_SEARCH:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{owner}.a_clip={value!r}: must lie in (0, 1] (1 = no clipping) or be "
                         f"{CLIP_SEARCH!r} (chosen per linear on the calibration data)")


def _overridable(linear: LinearQuant) -> dict[str, Any]:
    return {k: getattr(linear, k) for k in OVERRIDABLE}


@dataclass(frozen=True)
class QuantConfig:
    """Quantization and rotation settings.

    Args:
        w_bits: weight bits, one of 4, 8, 16 (16 = unquantized).
        a_bits: activation bits for the inputs of decoder linears, one of 4, 8, 16 (lm_head keeps 16).
        kv_bits: KV-cache bits, one of 4, 8, 16 (asymmetric, one group per token and head).
        w_method: weight quantizer, "rtn" (round to nearest) or "gptq" (needs calibration data).
        w_group_size: weight scales per group of this many input columns; None = per output channel.
        w_clip_search: choose each weight scale's clip factor by an MSE search (RTN and GPTQ);
            False takes the full range: faster to compile (the search is 40 passes over every
            weight), a little less accurate; ``python -m asaf_fx bench`` turns it off.
        a_clip: activation clip ratio: per-token range = a_clip · max|x| (1 = none); or "mse": each
            linear's ratio is chosen from 1.0, 0.95, ..., 0.5 by the squared error of its output
            on the calibration data (needs calibration=; the compiled model's ``quant`` then
            lists the chosen ratios as overrides, see ``pin``).
        rotate: apply QuaRot-style rotations (residual stream, online Hadamards before down_proj and
            o_proj, head-wise V/O, online Q/K after RoPE). Function-preserving on its own.
        rotation: residual rotation, "hadamard" (random-sign Hadamard) or "orthogonal" (random).
        seed: seed for every random choice (rotation signs and odd-size factors).
        overrides: per-linear settings by pattern on the weight's name (``fnmatch``, first match
            wins), e.g. ``{"*.down_proj.weight": {"a_bits": 8}, "model.layers.0.*": {"w_bits": 8}}``;
            keys of each value: w_bits, a_bits, w_group_size, a_clip, w_method.
    """

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    w_method: str = "rtn"
    w_group_size: int | None = None
    w_clip_search: bool = True
    a_clip: float | str = 1.0
    rotate: bool = True
    rotation: str = "hadamard"
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    version: ClassVar[int] = 4

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits("QuantConfig", name, getattr(self, name))
        if self.w_method not in WEIGHT_METHODS:
            raise ValueError(f"QuantConfig.w_method={self.w_method!r}: must be one of {tuple(WEIGHT_METHODS)}")
        _check_group_size("QuantConfig", self.w_group_size)
        _check_clip("QuantConfig", self.a_clip)
        if self.rotation not in _ROTATIONS:
            raise ValueError(f"QuantConfig.rotation={self.rotation!r}: must be one of {_ROTATIONS}")
        for name in ("rotate", "w_clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r}: must be True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuantConfig.seed={self.seed!r}: must be a non-negative int")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"QuantConfig.overrides must be a dict of pattern -> settings, got "
                             f"{type(self.overrides).__name__}")
        for pattern, settings in self.overrides.items():
            owner = f"QuantConfig.overrides[{pattern!r}]"
            if not isinstance(pattern, str) or not isinstance(settings, dict):
                raise ValueError(f"{owner}: keys must be name patterns and values dicts of settings")
            unknown = set(settings) - set(OVERRIDABLE)
            if unknown:
                raise ValueError(f"{owner}: unknown settings {sorted(unknown)}; allowed: {', '.join(OVERRIDABLE)}")
            self.for_linear("", settings)  # validates the merged values

    @property
    def quantizes(self) -> bool:
        bits = [self.w_bits, self.a_bits, self.kv_bits]
        bits += [s.get(k, 16) for s in self.overrides.values() for k in ("w_bits", "a_bits")]
        return min(bits) < 16

    def for_linear(self, weight_name: str, settings: dict[str, Any] | None = None) -> LinearQuant:
        """The settings of one linear: the first override whose pattern matches ``weight_name``."""
        if settings is None:
            settings = next((s for p, s in self.overrides.items() if fnmatch.fnmatchcase(weight_name, p)), {})
        merged = {k: settings.get(k, getattr(self, k)) for k in OVERRIDABLE}
        owner = f"QuantConfig (for {weight_name or 'an override'})"
        _check_bits(owner, "w_bits", merged["w_bits"])
        _check_bits(owner, "a_bits", merged["a_bits"])
        _check_group_size(owner, merged["w_group_size"])
        _check_clip(owner, merged["a_clip"])
        if merged["w_method"] not in WEIGHT_METHODS:
            raise ValueError(f"{owner}.w_method={merged['w_method']!r}: must be one of {tuple(WEIGHT_METHODS)}")
        return LinearQuant(**merged, w_clip_search=self.w_clip_search)

    def check_overrides(self, weight_names: Sequence[str]) -> None:
        """Refuse an override pattern that matches none of ``weight_names`` (the model's decoder
        linear weights): a typo would otherwise leave the linears it meant at the defaults."""
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in weight_names):
                close = difflib.get_close_matches(pattern, weight_names, n=3, cutoff=0.0)
                raise ValueError(f"QuantConfig.overrides[{pattern!r}] matches no decoder linear weight of this model; "
                                 f"names look like {', '.join(close)} (patterns match whole names: end with "
                                 "'.weight', or '*')")

    def pin(self, settings: Mapping[str, Mapping[str, Any]]) -> QuantConfig:
        """This config with each named linear's settings changed by ``settings[name]``.

        The pins are overrides of the linears' full settings, placed before the user's patterns
        (first match wins), so every other setting of a pinned linear stays what this config
        gives it. ``compile`` pins the ratios an ``a_clip="mse"`` search chose (its result and a
        checkpoint then quantize with no search left to run); choosing 8-bit layers pins
        ``a_bits``.
        """
        pinned = {
            glob.escape(name): {**_overridable(self.for_linear(name)), **change} for name, change in settings.items()
        }
        return replace(self, overrides={**pinned, **{p: s for p, s in self.overrides.items() if p not in pinned}})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``version``, that ``from_dict`` turns back into this config."""
        return {"version": self.version, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        version = data.pop("version", cls.version)
        # Version 1 lacked w_group_size, a_clip and overrides; version 2 lacked w_clip_search;
        # version 3 lacked a_clip="mse". Each reads as it did.
        if version not in (1, 2, 3, cls.version):
            raise ValueError(f"QuantConfig version {version} is not supported (this is version {cls.version})")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class PruneConfig:
    """How a sparsity plan becomes removed MLP channels.

    Args:
        granularity: channels are removed in blocks of this many, so pruned widths stay multiples
            of it (kernel-friendly); it must divide the model's MLP width.
        refit: refit down_proj over the kept channels so that, on the calibration data, it best
            reproduces the unpruned MLP's output, with a ridge towards the unrefitted columns
            (``channel_selection.refit_down_proj``; its strength was chosen on held-out text). On
            SmolLM2 at 10 % uniform sparsity (16 bits) it lowers the perplexity rise on the whole
            test split from +23.9 % to +18.7 % (docs/results.md). Off: pruning only deletes.
    """

    granularity: int = 32
    refit: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.granularity, bool) or not isinstance(self.granularity, int) or self.granularity <= 0:
            raise ValueError(f"PruneConfig.granularity={self.granularity!r}: must be a positive int, e.g. 32")
        if not isinstance(self.refit, bool):
            raise ValueError(f"PruneConfig.refit={self.refit!r}: must be True or False")
