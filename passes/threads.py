"""Run overhead-bound loops on one intra-op thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Use one intra-op thread inside the block, then restore the previous count.

    Loops of many tiny ops (GPTQ's column loop, token-by-token decoding) pay a thread hand-off per
    op that costs more than the arithmetic; on 2 busy cores this was measured 10–25× slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
