#!/usr/bin/env bash
# GPU readiness check, one command on a GPU host (under 8 minutes on an H100/H200):
#
#   tools/gpu_check.sh              # the machine, the GPU-relevant tests on the GPU, then the
#                                   # benchmarks: BERT-base at seq 128 and 512, ModernBERT-base at
#                                   # seq 1024 on packed rows; bf16, cuDNN attention; tokens/s, MFU
#   GPU_CHECK_DRY=1 tools/gpu_check.sh   # the same steps, tiny and on the CPU: proves the script
#
# PYTHON (default .venv/bin/python, installed with '.[cuda,test]') runs everything. The exit status
# is the number of failed steps (0: all passed). MFU is against the device kind's dense bf16 peak
# (mlm_jax.metrics; 989 TFLOP/s for H100/H200 SXM). Targets (issue #15): BERT-base s128 >= 40% MFU,
# ModernBERT-base s1024 packed >= 45%.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=${GPU_CHECK_DRY:-0}
LOG=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
FAILED=0
START=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, shows its output, counts a failure
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name ($(( SECONDS - START ))s elapsed)"
  if timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"; then
    echo "--- $name: ok"
  else
    echo "--- $name: FAILED (exit ${PIPESTATUS[0]}; log $LOG/$name.log)"
    FAILED=$(( FAILED + 1 ))
  fi
}

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  IMPL=xla  # cuDNN needs a GPU; the dry run proves the script, not the kernel
  BERT="--layers 2 --hidden 64 --heads 2 --intermediate 128 --vocab 1000 --steps 5"
  B128="--seq 128 --batch 4"; B512="--seq 256 --batch 2"
  MODERN="--layers 3 --hidden 64 --heads 2 --intermediate 96 --vocab 1000 --seq 256 --batch 2 --steps 5"
else
  export JAX_PLATFORMS=cuda  # tests/conftest.py keeps it (it fakes 8 CPU devices otherwise)
  IMPL=cudnn
  # Batches of 64K tokens: large enough for the GPU's matmuls, well within 80 GB in bf16.
  BERT="--layers 12 --hidden 768 --heads 12 --intermediate 3072 --vocab 30522 --steps 20"
  B128="--seq 128 --batch 512"; B512="--seq 512 --batch 128"
  MODERN="--layers 22 --hidden 768 --heads 12 --intermediate 1152 --vocab 30522 --seq 1024 --batch 64 --steps 20"
fi
# Our configs' attention dropout (none: cuDNN's fused kernel has none); dropout 0.1 for BERT.
COMMON="--dtype bfloat16 --attention_impl $IMPL --attention_dropout 0"

echo "=== machine"
nvidia-smi || echo "(no nvidia-smi)"
"$PY" -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())' \
  || FAILED=$(( FAILED + 1 ))

# Tests whose code paths differ on a GPU. In bf16: cuDNN attention (vs XLA, packed segments,
# gradients), the bf16 step's gemms, ModernBERT's bf16 step (once its module is there). In fp32, on
# one device: the train step's masks, packing, accumulation, remat/scan, the non-finite guard;
# ModernBERT's packing and scan. fp32 matmuls there in full fp32 (not TF32): those tests compare
# numbers at 1e-5.
BF16_TESTS=(tests/test_bf16.py)
FP32_TESTS=("tests/test_train_step.py::test_only_masked_slots_affect_the_loss"
            "tests/test_train_step.py::test_padding_rows_do_not_change_the_loss_or_produce_nans"
            "tests/test_train_step.py::test_packed_segments_do_not_attend_to_each_other"
            "tests/test_train_step.py::test_grad_accumulation_equals_one_big_batch"
            "tests/test_train_step.py::test_remat_and_scan_do_not_change_the_numbers"
            "tests/test_train_step.py::test_nonfinite_update_is_never_applied")
if [ -f tests/test_modernbert.py ]; then
  BF16_TESTS+=("tests/test_modernbert.py::test_bf16_forward_and_backward_are_finite_and_close_to_fp32")
  FP32_TESTS+=("tests/test_modernbert.py::test_packed_records_give_each_record_s_own_logits"
               "tests/test_modernbert.py::test_scan_and_remat_do_not_change_the_numbers")
fi
step tests_bf16 150 "$PY" -m pytest -q -p no:cacheprovider "${BF16_TESTS[@]}"
step tests_fp32 150 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider \
  "${FP32_TESTS[@]}"

step bert_base_s128 150 "$PY" tools/benchmark.py $BERT $B128 $COMMON
step bert_base_s512 150 "$PY" tools/benchmark.py $BERT $B512 $COMMON
if "$PY" -c 'import mlm_jax.modernbert' 2>/dev/null; then
  step modernbert_base_s1024_packed 180 "$PY" tools/benchmark.py --arch modernbert $MODERN \
    --packed 4 $COMMON
else
  echo "=== modernbert_base_s1024_packed: skipped (no mlm_jax/modernbert.py yet)"
fi

echo
echo "=== summary ($(( SECONDS - START ))s)"
for name in bert_base_s128 bert_base_s512 modernbert_base_s1024_packed; do
  [ -f "$LOG/$name.log" ] && echo "$name: $(grep '^RESULT' "$LOG/$name.log" | tail -1)"
done
echo "targets: bert_base_s128 mfu >= 0.40, modernbert_base_s1024_packed mfu >= 0.45"
echo "failed steps: $FAILED (logs in $LOG)"
exit "$FAILED"
