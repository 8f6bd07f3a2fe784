#!/usr/bin/env bash
# One-shot check for a lent GPU machine (see the device tool's README): the environment, the
# compiled GPU tests (bf16 included), the standard benchmark set and the end-to-end step.
#
#   bench/device_check.sh OUT_DIR             on the GPU machine (the device tool: $OUT)
#   bench/device_check.sh --dry-run OUT_DIR   on a CPU: same stages, smoke sizes, no install
#
# Runs with the machine's own python3 (torch, triton, peft, transformers, pytest, matplotlib
# already there) and installs nothing from the network. Every stage has a time limit so that
# the files under OUT_DIR come back even if one overruns: at most 9 min of stages, inside the device
# tool's 10-minute limit per command (call it with timeout_s 600) and, with the machine's start
# (1-2 min), the 15 minutes lent.
# OUT_DIR receives: device_check.log, env.txt, tests.txt, lora_linear.csv, ratio_to_base.png,
# speedup_vs_eager.png, e2e.csv, dora/lora_linear.csv and qlora/lora_linear.csv (+ their plots).
# The QLoRA stage needs bitsandbytes, which the GPU image lacks: carry its wheel (the device
# tool's README: `pip download ... -d .whl bitsandbytes==0.50.0`, `carry: [".whl"]`); this script
# installs .whl/*.whl into /tmp/site when that folder exists, and skips the stage otherwise.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/device_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
exec > >(tee "$OUT/device_check.log") 2>&1
stage() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

stage "environment"
{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown"
  git status --porcelain --untracked-files=no 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__); \
print('triton', triton.__version__); print('cuda', torch.version.cuda, torch.cuda.is_available()); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|peft|transformers|safetensors|numpy|pytest|matplotlib) "
} | tee "$OUT/env.txt"

if [ $DRY = 0 ]; then
  stage "install fastlora (no network, no dependencies)"
  "$PY" -m pip install -q --no-deps --no-build-isolation . || { echo "install failed"; exit 1; }
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
HAS_BNB=$("$PY" -c "import bitsandbytes" 2>/dev/null && echo 1 || echo 0)
echo "bitsandbytes importable: $HAS_BNB"

stage "compiled GPU tests"
# The broad pass uses fixed configs (no autotuning: one compile per kernel variant); a second
# pass runs the large bf16 shapes through the autotuner, the path real training takes.
if [ $DRY = 0 ]; then
  FASTLORA_AUTOTUNE=0 timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_lora_linear.py tests/test_dropout.py tests/test_launches_and_memory.py tests/test_layer.py \
    tests/test_peft.py tests/test_training_setups.py tests/test_errors.py tests/test_qlora.py tests/test_dora.py \
    -k "gpu or triton or cuda or test_gpu" \
    2>&1 | tee "$OUT/tests.txt" | tail -40
  echo "== both paths (fused, hybrid), bf16 and fp32 LoRA math included" | tee -a "$OUT/tests.txt"
  FASTLORA_AUTOTUNE=0 timeout 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_paths.py \
    2>&1 | tee -a "$OUT/tests.txt" | tail -15
  echo "== autotuned pass" | tee -a "$OUT/tests.txt"
  timeout 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "large_shapes and bf16 and A32" \
    2>&1 | tee -a "$OUT/tests.txt" | tail -15
else
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_dropout.py \
    2>&1 | tee "$OUT/tests.txt" | tail -5
fi

stage "benchmark: standard set"
if [ $DRY = 0 ]; then
  timeout 210 "$PY" -m bench --preset device --warmup 10 --rep 50 --no-progress --out "$OUT"
else
  timeout 120 "$PY" -m bench --smoke --no-progress --out "$OUT"
fi
echo "bench exit: $?"

stage "benchmark: DoRA (PEFT's DoRA vs fastlora's, fastlora's LoRA, the frozen base)"
if [ $DRY = 0 ]; then
  timeout 40 "$PY" -m bench --preset dora --warmup 10 --rep 40 --no-progress --out "$OUT/dora"
else
  timeout 120 "$PY" -m bench --smoke --providers base fastlora peft-dora fastlora-dora --modes fwd+bwd \
    --no-progress --out "$OUT/dora"
fi
echo "dora bench exit: $?"

stage "benchmark: QLoRA (NF4 base: PEFT + bitsandbytes vs fastlora, peak memory)"
if [ "$HAS_BNB" = 1 ]; then
  if [ $DRY = 0 ]; then
    timeout 50 "$PY" -m bench --preset qlora --warmup 10 --rep 40 --no-progress --out "$OUT/qlora"
  else
    timeout 120 "$PY" -m bench --smoke --providers base qlora-base peft-qlora fastlora-qlora --modes fwd+bwd \
      --no-progress --out "$OUT/qlora"
  fi
  echo "qlora bench exit: $?"
else
  echo "skipped: bitsandbytes is not installed (carry its wheel in .whl/)"
fi

stage "benchmark: end-to-end Llama step"
if [ $DRY = 0 ]; then
  timeout 50 "$PY" -m bench.bench_e2e --layers 2 --batch 4 --seq 2048 --steps 5 --out "$OUT"
else
  timeout 120 "$PY" -m bench.bench_e2e --smoke --out "$OUT"
fi
echo "e2e exit: $?"

stage "done"
ls -la "$OUT"
