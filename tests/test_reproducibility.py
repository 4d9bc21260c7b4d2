"""Two processes compiling the same model get the same bits.

In-process repeats share hash seeds, memory layout and thread pools, so they cannot show
run-to-run differences; 4-bit rounding turns any last-bit difference upstream (a Hessian, an
activation scale) into different integers, so this checks across processes with different
``PYTHONHASHSEED`` and intra-op thread counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = """
import hashlib, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import make_tiny
import asaf_fx
from asaf_fx.config import QuantConfig
from asaf_fx.inspection import tensors_digest
from asaf_fx.plan import uniform_plan

torch.set_num_threads({threads})
model = make_tiny("llama", intermediate_size=256)
ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(3))
cm = asaf_fx.compile(model, uniform_plan(2, 0.25), calibration=ids,
                     quant=QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="gptq"))
print(hashlib.sha256(tensors_digest(cm).encode() + cm(ids).logits.detach().numpy().tobytes()).hexdigest())
"""


def _digest(hash_seed: int, threads: int) -> str:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    done = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(TESTS), threads=threads)],
                          env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_w4a4_gptq_compile_with_a_plan_is_bit_identical_across_processes_and_thread_counts():
    first, second = _digest(hash_seed=1, threads=2), _digest(hash_seed=2, threads=1)
    assert len(first) == 64 and first == second
