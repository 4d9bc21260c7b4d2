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


def distinct_variants(entries: list[Entry], removed: list[list[int]]) -> tuple[list[Entry], dict[Entry, Entry]]:
    """The entries worth measuring, and which measured entry each entry equals.

    Two levels that round to the same channel count at the granularity (on SmolLM2, 1 % and 2 %
    both remove one block of 32) prune a group identically, so their ξ is the same measurement:
    only the first entry (in ``entries`` order) of each ``(start, length, channel counts)`` is
    measured. ``removed[layer][level]`` is the channel count of ``layer`` at ``level``.
    """
    first: dict[tuple, Entry] = {}
    same_as: dict[Entry, Entry] = {}
    for entry in entries:
        start, length, level = entry
        key = (start, length, tuple(removed[layer][level] for layer in range(start, start + length)))
        same_as[entry] = first.setdefault(key, entry)
    return list(first.values()), same_as
