#!/usr/bin/env bash
# The GPU check: the CUDA path of every stage (tests/test_gpu.py) and generation throughput on the default
# backbone's shapes, on one CUDA machine. CI has no GPU; run this by hand where one is available and put the
# numbers in benchmarks/README.md. Results go to $OUT (default runs/gpu-check). WHEELS and ASSETS name the
# two folders below when they live elsewhere.
#
# On a machine with the project installed (`make setup TORCH_SPEC=torch`): `bash benchmarks/gpu_check.sh`.
# On a bare CUDA machine that has PyTorch but cannot reach PyPI or the packaged backbone, prepare two ignored
# folders here and copy them along: `.whl/` (wheels of the missing packages, installed into /tmp/site) and
# `.gpu/` (the default backbone's tokenizer in .gpu/tokenizer and its config.json as .gpu/smollm2-config.json;
# the tests' tiny model and the throughput model are built from them, with random weights).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=$(realpath -m "${WHEELS:-.whl}")
ASSETS=$(realpath -m "${ASSETS:-.gpu}")
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    rm -rf /tmp/site  # a warm machine may hold wheels of an earlier try
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
fi
if [ -d "$ASSETS/tokenizer" ]; then export ESC_EVOLVE_TEST_TOKENIZER="$ASSETS/tokenizer"; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee -a "$OUT/gpu.txt"

# 1. The CUDA path of generation, SFT, DPO and the whole pipeline.
$PY -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log"
status=${PIPESTATUS[0]}

# 2. Generation throughput: naive loop vs engine on the default backbone's shapes, fp32 and bf16.
model=smollm2-135m-instruct
if [ -f "$ASSETS/smollm2-config.json" ]; then
    model=/tmp/smollm2-random
    $PY benchmarks/random_backbone.py "$ASSETS/smollm2-config.json" "$ASSETS/tokenizer" "$model" || exit 1
fi
for dtype in float32 bfloat16; do
    sweep=$([ "$dtype" = bfloat16 ] && echo --sweep)
    $PY benchmarks/generation.py --model "$model" --device cuda --dtype "$dtype" --batch-size 32 --prompts "${PROMPTS:-32}" $sweep \
        --out "$OUT/generation_gpu_$dtype.json" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/generation_gpu_$dtype.log"
done
exit "$status"
