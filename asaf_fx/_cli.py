"""Argument types shared by the command-line tools."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from asaf_fx._atomic import write_text_atomic


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``low``, refused with a message naming the value otherwise."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{number} is below {low}")
        return number

    return parse


def emit_report(report: dict[str, Any], out: Path | None, render: Callable[[dict[str, Any], Console], None],
                console: Console) -> None:
    """JSON to stdout (and atomically to ``out``), the human-readable rendering to ``console``."""
    text = json.dumps(report, indent=2)
    if out is not None:
        write_text_atomic(out, text + "\n")
    render(report, console)
    sys.stdout.write(text + "\n")
