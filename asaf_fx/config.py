"""``QuantConfig``: how ``asaf_fx.compile`` transforms a model (torchao-style frozen config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

_BITS = (4, 8, 16)
_W_METHODS = ("rtn", "gptq")
_ROTATIONS = ("hadamard", "orthogonal")


@dataclass(frozen=True)
class QuantConfig:
    """Quantization and rotation settings.

    Args:
        w_bits: weight bits, one of 4, 8, 16 (16 = unquantized).
        a_bits: activation bits for linear inputs, one of 4, 8, 16.
        kv_bits: KV-cache bits, one of 4, 8, 16.
        w_method: weight quantizer, "rtn" (round to nearest) or "gptq".
        rotate: apply QuaRot-style rotations (residual stream, online Hadamard before down_proj,
            head-wise V/O, online Q/K after RoPE). Function-preserving on its own.
        rotation: residual rotation, "hadamard" (random-sign Hadamard) or "orthogonal" (random).
        seed: seed for every random choice (rotation signs and odd-size factors).
    """

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    w_method: str = "rtn"
    rotate: bool = True
    rotation: str = "hadamard"
    seed: int = 0

    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in _BITS:
                raise ValueError(f"QuantConfig.{name}={value!r}: must be one of {_BITS}")
        if self.w_method not in _W_METHODS:
            raise ValueError(f"QuantConfig.w_method={self.w_method!r}: must be one of {_W_METHODS}")
        if self.rotation not in _ROTATIONS:
            raise ValueError(f"QuantConfig.rotation={self.rotation!r}: must be one of {_ROTATIONS}")
        if not isinstance(self.rotate, bool):
            raise ValueError(f"QuantConfig.rotate={self.rotate!r}: must be True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuantConfig.seed={self.seed!r}: must be a non-negative int")

    @property
    def quantizes(self) -> bool:
        return min(self.w_bits, self.a_bits, self.kv_bits) < 16

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``version``, that ``from_dict`` turns back into this config."""
        return {"version": self.version, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise ValueError(f"QuantConfig version {version} is not supported (this is version {cls.version})")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**data)
