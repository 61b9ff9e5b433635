#!/usr/bin/env bash
# The checks that need a GPU, in stages that each fit one 10-minute call of a lent machine. With 15 minutes of
# device time, run the default stage (under 8 minutes) and give the machine back:
#
#   bash bench/gpu_session.sh         # inductor's compiled fp8-compute blocks (the target step's path) against
#                                     # eager LoRA gradients on CUDA, the fused adaLN / MLP-activation + fp8
#                                     # rounding kernels on CUDA
#                                     # (tests/test_fp8_producers.py), then the two target rows: the Flux forward (bf16, fp8 compute, compiled, both, and the
#                                     # fast-accumulation / cuDNN-attention trials; diffusers eager and compiled) at
#                                     # 1024 px, and the SCFM step (released vs ours, ours with unchecked blocks
#                                     # alone, and fp8 compute + compile + unchecked; its grads % must read 100)
#   bash bench/gpu_session.sh compiled  # what compiled blocks keep for backward against eager (block_memory.py),
#                                     # the fast step with every block unchecked, and with fast accumulation
#   bash bench/gpu_session.sh step    # SCFM step at Flux-dev shapes: ours vs the released design (twice), fp8
#   bash bench/gpu_session.sh memory  # the same step with block swap (bf16, fp8) and with unchecked blocks
#   bash bench/gpu_session.sh tests   # the CUDA paths of the tests: Triton kernels, fp8 dequant, block swap
#   bash bench/gpu_session.sh layers  # one LoRA layer vs peft, the dequant and fused producer kernels, LoRA loading,
#                                     # Flux forward
#
# Each command's output is appended to $OUT/<name>.txt (the device tool's folder; bench-out/ elsewhere), and
# its exit status to $OUT/status.txt (124: its time limit cut it short). Each stage's limits add up to under its
# budget: the default stage 470 s (under 8 minutes), the others at most 560 s (inside one 10-minute device call).
# The device image has no diffusers: wheels in .whl/ (see README, "Benchmarks") are installed when present.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi

run() {  # run NAME SECONDS COMMAND...: a time limit per command, so one hang cannot eat the whole call
    local name=$1 limit=$2
    shift 2
    echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$out/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$rc $name: $*" >>"$out/status.txt"
    [ "$rc" = 124 ] && echo "== cut short after $limit s" | tee -a "$out/$name.txt"
    return 0
}

timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
timeout 30 python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/device.txt"
case "${1:-target}" in
    target)
        run tests 100 python -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_fp8_compute.py \
            tests/test_fp8_producers.py -k "(inductor and fp8compute) or gpu or producers"
        run flux_forward 150 python bench/flux_forward.py --device cuda --cases flux-dev-1024 --variants all --iters 3
        run train_step 220 python bench/train_step.py --device cuda --iters 4 --only released ours-unchecked ours-fast \
            --unchecked_blocks "${UNCHECKED:-auto}" --max_memory 40GB ;;
    compiled)
        run tests 180 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k inductor
        run block_memory 100 python bench/block_memory.py --device cuda --fp8_compute
        run block_memory 60 python bench/block_memory.py --device cuda
        run train_step 110 python bench/train_step.py --device cuda --iters 3 --only ours-fast --unchecked_blocks 57
        run train_step 110 python bench/train_step.py --device cuda --iters 3 --only ours-fast \
            --unchecked_blocks "${UNCHECKED:-auto}" --max_memory 40GB --fast_accum ;;
    step)
        run train_step 560 python bench/train_step.py --device cuda --iters 8 --fp8 --rounds 2 ;;
    memory)
        run train_step_memory 560 python bench/train_step.py --device cuda --iters 8 --fp8 --blocks_to_swap 19 \
            --unchecked_blocks 6 --skip released "released*" ours-fp8 ;;
    tests)
        run tests 560 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_block_swap.py \
            tests/test_fp8_compute.py tests/test_fp8_producers.py ;;
    layers)
        run lora_layer 120 python bench/lora_layer.py --device cuda
        run kernels 180 python bench/kernels.py --device cuda --ops dequant_rows adanorm_fp8 gelu_fp8 --skip-model
        run load_loras 120 python bench/load_loras.py --device cuda
        run flux_forward 140 python bench/flux_forward.py --device cuda ;;
    *)
        echo "usage: bash bench/gpu_session.sh [target|compiled|step|memory|tests|layers]" >&2
        exit 2 ;;
esac
