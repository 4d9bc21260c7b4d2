"""Which (start, length, level) entries a calibration mode measures, in a fixed order.

* ``per-layer``: every single layer at every level (p × S).
* ``groups`` with ``max_length`` k: every group of up to k consecutive layers (Σ_{n≤k} (p−n+1) × S).
* ``full``: every group (p(p+1)/2 × S), meant for GPUs.

The order is by start layer, then length, then level: an evaluation that starts at layer i reuses
the cached hidden states at layer i, so measurements sharing a start run back to back.
"""

from __future__ import annotations

MODES = ("per-layer", "groups", "full")

Entry = tuple[int, int, int]  # (start, length, level)


def planned_entries(num_layers: int, num_levels: int, mode: str, max_length: int | None = None) -> list[Entry]:
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "per-layer":
        longest = 1
    elif mode == "full":
        longest = num_layers
    else:
        if max_length is None or max_length < 1:
            raise ValueError(f"mode 'groups' needs --max-length k >= 1, got {max_length!r}")
        longest = min(max_length, num_layers)
    return [
        (start, length, level)
        for start in range(num_layers)
        for length in range(1, min(longest, num_layers - start) + 1)
        for level in range(num_levels)
    ]
