#!/usr/bin/env bash
# The prepared GPU check: build, test and measure in one go on a CUDA machine, every figure
# written under one folder, so that the first minutes on a GPU go to measuring.
#
#     bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else bench/results/gpu
#
# Stages (each logged to OUT_DIR/<stage>.log; a failed stage is recorded and the rest still run):
#   env        nvidia-smi, torch/triton versions, what each backend reports
#   build      pip install -e . (builds neuralpatch._C with nvcc and neuralpatch._cpu)
#   cuda-tests pytest -m cuda
#   kernels    bench/run.py --device cuda (patch_nn table against cuBLAS), CSV
#   patchmatch bench/bench_patchmatch.py on the GPU: exact against PatchMatch, side by side
#   e2e        bench/bench_inpaint.py at 512², 256² hole, the paper's 100 iterations per scale
#   hires      bench/hires.py at 4096², 2048² hole (the 60 s target), result PNG
# Sized to finish within about 8 minutes on an H100-class GPU; STAGE_TIMEOUT caps each stage.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
stage_timeout=${STAGE_TIMEOUT:-240}
summary="$out/summary.txt"
: >"$summary"

run_stage() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$summary"
    if timeout "$stage_timeout" "$@" >"$out/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$summary"
    else
        echo "   FAILED (exit $?) after $((SECONDS - start)) s; last lines:" | tee -a "$summary"
        tail -n 15 "$out/$name.log" | sed 's/^/   | /' | tee -a "$summary"
    fi
}

run_stage env bash -c 'nvidia-smi; python -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); import neuralpatch; print(neuralpatch.available_backends(\"cuda\"))"'
run_stage build python -m pip install -e ".[test,bench]"
run_stage cuda-tests python -m pytest -q -m cuda -p no:cacheprovider
run_stage kernels python bench/run.py --device cuda --csv "$out/kernels.csv"
run_stage patchmatch python bench/bench_patchmatch.py --device cuda
run_stage e2e python bench/bench_inpaint.py --size 512 --hole 256 --iterations 100 --skip-naive
run_stage hires python bench/hires.py --size 4096 --hole 2048 --device cuda --out "$out/hires_4096.png"

echo "== tables" | tee -a "$summary"
for name in kernels patchmatch e2e hires; do
    echo "-- $name" >>"$summary"
    grep -E '^\||x[0-9]+|speed-up| s, peak' "$out/$name.log" | tail -n 40 >>"$summary" || true
done
cat "$summary"
