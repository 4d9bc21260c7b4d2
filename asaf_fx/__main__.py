"""python -m asaf_fx COMMAND ...: one entry point for the command-line tools.

``run`` is the end-to-end pipeline (``asaf_fx.run``); ``curve`` measures it at several budgets
against uniform sparsity (``asaf_fx.tradeoff_curve``); the others are its single steps. Each command
is a thin layer in ``asaf_fx.cli`` over a Python function.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {name: f"asaf_fx.cli.{name}" for name in ("run", "curve", "calibrate", "plan", "eval", "bench")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        sys.stderr.write(f"usage: python -m asaf_fx {{{','.join(COMMANDS)}}} ...\n{given}"
                         "'run' = calibrate → solve → compile → measure; 'curve' = ASAF and uniform at several "
                         "budgets; COMMAND --help for its options\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
