#!/usr/bin/env bash
# GPU check, for a machine with CUDA (run from anywhere; about 7 minutes, at most 9.5):
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# 1. the CUDA-only tests (they are skipped on CPU machines; here a skip is a failure);
# 2. the segmenter benchmark on CUDA, faithful mode, with both saliency settings: FOUND at full
#    resolution (the paper's) and at --saliency-max-side 1024: images/s and the share of time
#    outside the CLIP and DINO forwards;
# 3. a short labelling job on GPU actors (one per GPU): images/s per GPU and the share of the
#    actors' time outside the model forwards;
# 4. NACLIP (random ViT-B/16) on mixed-size photos, whole image and sliding windows, each with and
#    without PAMR: images/s per GPU, images per forward, share of time outside the forwards, GPU
#    memory peak (benchmarks/gpu_naclip_check.py);
# 5. the job with the benchmark-only free model (no model cost) on GPU actors: the host side's
#    images/s per GPU against a bare read-and-decode loop on the machine's cores;
# 6. Trident in fp16 on CUDA (random ViT-B/16, DINO ViT-B/16, SAM ViT-B; the authors' casts) against
#    its float32 path on the CPU: the label agreement, without and with SAM refinement
#    (tests/test_trident.py::test_fp16_labels_agree_with_float32[cuda]; it prints the figures).
# Without CUDA it stops at once with exit 2 and one line. Each step has its own time limit, and
# every limit is cut to what is left of 560 s, so the whole check ends within 9.5 minutes; the first
# failing step ends the script with its status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: error: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"gpu_check.sh: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")'
started=$SECONDS

budget=560  # seconds for all steps: under 9.5 minutes with the start and the imports
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 0 ]; then
        echo "gpu_check.sh: error: no time left for $name (budget ${budget} s)" >&2
        exit 124
    fi
    echo "== $name (limit ${limit} s, $((SECONDS - started)) s elapsed)"
    local status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        [ "$status" -eq 124 ] && echo "gpu_check.sh: error: $name ran past ${limit} s" >&2
        echo "gpu_check.sh: error: $name failed (exit $status)" >&2
        exit "$status"
    fi
}

# -rs lists skips; with CUDA present none of these may skip.
cuda_tests=(
    tests/test_dense.py::test_stays_on_the_device_and_matches_cpu
    tests/test_preprocess.py::test_bicubic_is_exact_on_cuda
    tests/test_preprocess.py::test_float32_split_is_chosen_only_on_cuda_and_where_exact
    tests/test_clip_model.py::test_low_precision_keeps_float32_outputs
)
log=$(mktemp)
step "CUDA tests" 80 bash -c '"$0" -m pytest -q -rs -p no:cacheprovider "${@}" 2>&1 | tee "'"$log"'"; exit "${PIPESTATUS[0]}"' "$PYTHON" "${cuda_tests[@]}"
if grep -q "SKIPPED" "$log"; then
    echo "gpu_check.sh: error: a CUDA test was skipped on a CUDA machine" >&2
    exit 1
fi
rm -f "$log"

step "segmenter benchmark, CUDA, faithful, FOUND at full resolution" 70 \
    "$PYTHON" benchmarks/bench_segmenter.py --device cuda --saliency found --images 32 --reference-images 1
step "segmenter benchmark, CUDA, faithful, FOUND at --saliency-max-side 1024" 55 \
    "$PYTHON" benchmarks/bench_segmenter.py --device cuda --saliency found --saliency-max-side 1024 --images 32 --reference-images 1

step "labelling job on GPU actors" 100 "$PYTHON" benchmarks/gpu_job_check.py --repeat 4
step "NACLIP on CUDA: whole, slide, with and without PAMR, mixed sizes" 90 \
    "$PYTHON" benchmarks/gpu_naclip_check.py --batch-size 16
step "free-model job on GPU actors (host side)" 75 "$PYTHON" benchmarks/gpu_job_check.py --free naclip --repeat 8

log=$(mktemp)
step "Trident fp16 on CUDA against float32: label agreement" 90 bash -c '"$0" -m pytest -q -s -rs -p no:cacheprovider "$1" 2>&1 | tee "'"$log"'"; exit "${PIPESTATUS[0]}"' \
    "$PYTHON" "tests/test_trident.py::test_fp16_labels_agree_with_float32[cuda]"
if grep -q "SKIPPED" "$log"; then
    echo "gpu_check.sh: error: the Trident fp16 CUDA test was skipped on a CUDA machine" >&2
    exit 1
fi
rm -f "$log"

echo "gpu_check.sh: done in $((SECONDS - started)) s"
