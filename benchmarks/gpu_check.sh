#!/usr/bin/env bash
# The GPU check in one command, about 9 minutes on one H200 with the defaults:
#   1. exactness of every GEMM path against the reference op, on the GPU (kernel tests);
#   2. the kernel table (benchmarks/gemm_table.py: each path at M = 1, 16, 2048 for 4096→11008 and
#      11008→4096, CUDA-graph timings);
#   3. the model bench, all 32 decoder layers of Llama-2-7B shapes, one process per variant, so that
#      one failure or time-out costs only its own cell;
#   4. serving (benchmarks/serve.py): time to first token and generate time of a 512- and a
#      2048-token prompt beside the forward and decode steps they are made of (part "serve").
# Measured on an H200 (BENCHMARKS.md): the kernel tests about 100 s; a 32-layer variant takes
# 10-30 s of asaf_fx.compile and 100-160 s in all (inductor's first calls included); every extra
# decode batch is one more compile.
# The full grid (both presets, five variants, decode batch 1 and 16) therefore needs about four
# such calls: run it with the knobs below, one preset or a few variants per call.
# Runs from a checkout with the machine's own torch/triton/transformers; when asaf_fx is not
# installed, the two mapped folders are linked into it for the run.
#
# Usage: bash benchmarks/gpu_check.sh OUT_DIR
# Knobs (environment): PRESETS (default llama2-7b), VARIANTS (default "w4a4kv4 fp16-compiled fp16-eager";
# all five: "w4a4kv4 fp16-compiled fp16-eager asaf w4a8kv4"), LAYERS (default: all),
# PARTS (default "exact kernels bench serve"; "profile" adds torch.profiler tables of 4 layers),
# BENCH_S (seconds per variant, 150), DECODE_BATCH (default 1), SEQ (default "512 2048 4096"),
# BATCH (default 4: batch 1 is a second inductor compilation of the prefill graph), KERNEL_M
# (default "1 16 2048"), KERNEL_SHAPES (default "4096x11008 11008x4096"), KERNELS_S (seconds for the
# table, 120), PROFILE_LAYERS (4), PROFILE_S (90), SERVE_QUANT (w4a4kv4), SERVE_S (240).
# Rehearsal without a GPU: PRESETS=tiny bash benchmarks/gpu_check.sh OUT (kernels print "no GPU").
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
parts=${PARTS:-exact kernels bench serve}
presets=${PRESETS:-llama2-7b}
variants=${VARIANTS:-w4a4kv4 fp16-compiled fp16-eager}
layers=${LAYERS:+--layers $LAYERS}
$py -c "import asaf_fx.passes" 2>/dev/null || {
    ln -sfn ../passes asaf_fx/passes && ln -sfn ../triton_kernels asaf_fx/triton_kernels; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, triton, transformers, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__, 'python', platform.python_version())"
} | tee "$out/env.txt"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

if [[ " $parts " == *" exact "* ]]; then
    stamp "exactness (kernel tests on this device)"
    timeout 180 $py -m pytest -q -x -p no:cacheprovider tests/kernels/test_gemm_routes.py tests/kernels/test_hadamard.py \
        >"$out/exact.log" 2>&1
    echo "exit $?"; tail -3 "$out/exact.log"
fi
if [[ " $parts " == *" kernels "* ]]; then
    stamp "kernel table"
    # shellcheck disable=SC2086
    timeout "${KERNELS_S:-120}" $py benchmarks/gemm_table.py --m ${KERNEL_M:-1 16 2048} \
        --shapes ${KERNEL_SHAPES:-4096x11008 11008x4096} --out "$out/kernels.json" \
        >"$out/kernels.log" 2>&1
    echo "exit $?"; cut -c1-400 "$out/kernels.log" | tail -25
fi
if [[ " $parts " == *" profile "* ]]; then  # not in the default parts: where the time of 4 layers goes
    for variant in $variants; do
        stamp "profile $variant (${PROFILE_LAYERS:-4} layers)"
        timeout "${PROFILE_S:-90}" $py benchmarks/kernel_profile.py --preset "${presets%% *}" --layers "${PROFILE_LAYERS:-4}" \
            --variant "$variant" >"$out/profile-$variant.log" 2>&1
        echo "exit $?"; grep -E "^prefill|^decode|Self CUDA time total|Self CPU time total|Error" "$out/profile-$variant.log"
    done
fi
if [[ " $parts " == *" bench "* ]]; then
    for preset in $presets; do
        for variant in $variants; do
            stamp "bench $preset $variant"
            # shellcheck disable=SC2086
            timeout "${BENCH_S:-150}" $py -m asaf_fx bench --preset "$preset" $layers --variants "$variant" \
                --seq ${SEQ:-512 2048 4096} --batch ${BATCH:-4} --repeats 3 --decode-tokens 64 \
                --decode-batch ${DECODE_BATCH:-1} --out "$out/$preset-$variant.json" >"$out/$preset-$variant.log" 2>&1
            echo "exit $?"; grep -E "built in|seq [0-9]+ ×|decode batch|error|Error" "$out/$preset-$variant.log" | tail -12
        done
    done
fi
if [[ " $parts " == *" serve "* ]]; then
    for preset in $presets; do
        stamp "serve $preset ${SERVE_QUANT:-w4a4kv4}"
        timeout "${SERVE_S:-240}" $py benchmarks/serve.py --model "$preset" --quant "${SERVE_QUANT:-w4a4kv4}" \
            --prompts 512 2048 --new 64 --json "$out/serve-$preset.json" >"$out/serve-$preset.log" 2>&1
        echo "exit $?"; tail -8 "$out/serve-$preset.log"
    done
fi
stamp "done"
