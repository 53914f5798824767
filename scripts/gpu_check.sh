#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU"): the engine tests on CUDA (tests/engine, whose specs
# ask for device "auto", plus tests/engine/test_cuda.py), then the engine-vs-reference speed
# benchmark on the GPU in fp32 and bf16, at the CPU benchmark's shape and at a GPU-sized one.
# Run from the repository root on a machine with a CUDA GPU and torch, pydantic, tokenizers,
# safetensors and numpy installed (the rest of the service is not needed). Results go to
# ${OUT:-bench/results/gpu} (pytest log, one JSON per benchmark).
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

echo "== engine tests on CUDA"
timeout 240 $py -m pytest tests/engine -q -ra -p no:cacheprovider --confcutdir=tests/engine \
    -o addopts="" --import-mode=importlib --timeout 120 2>&1 | tee "$out/engine_tests_cuda.log" | tail -40

bench() {  # name, extra args
    local name=$1; shift
    echo "== bench $name"
    timeout 150 $py bench/engine_vs_ref.py --device cuda --threads 0 --warmup 10 --repeats 2 \
        --json "$out/$name.json" "$@" 2>&1 | grep -E "repeat|ratio_engine|tokens_per_s_median|peak" 
}
bench cuda_fp32_small --steps 200
bench cuda_bf16_small --steps 200 --precision bf16
bench cuda_fp32_large --steps 100 --batch-size 128 --seq-len 128 --embed-dim 512 --hidden-dim 1024
bench cuda_bf16_large --steps 100 --batch-size 128 --seq-len 128 --embed-dim 512 --hidden-dim 1024 --precision bf16
echo "== done"
