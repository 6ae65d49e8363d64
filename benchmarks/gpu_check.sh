#!/usr/bin/env bash
# The prepared device check for one CUDA GPU, at most about 7 minutes: the ground-truth tests
# parametrized over devices (the fused attention kernels against the math kernel, bf16
# autocast), then model_cost.py on GPT-2 small (8 × 1024 tokens, bf16 autocast, the flash
# kernel; AdaHessian and curvlinops' products on the math kernel), ResNet-50 (batch 128, 224²,
# channels_last, both BatchNorm rules) and ViT-B/16 (batch 128), and a profile of one GPT-2
# estimate. Each section has its own time limit and a failing section does not stop the others.
# Writes at most 8 files to ${OUT:-gpu_check}/ (env.json, tests.log, gpt2.json, resnet50.json,
# vit_b_16.json, profile.json, profile.txt, log.txt) and prints their table last.
#
# curvlinops (pure Python) and what it needs beyond the GPU machine's packages travel as wheels
# in .whl/, installed for this run only:
#   pip download --no-deps -d .whl curvlinops-for-pytorch backpack-for-pytorch einconv unfoldNd
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}

section() {  # section NAME SECONDS COMMAND...: a time limit each; a failure stops nothing else
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), at most ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$log"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/hesscale-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/hesscale-site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
section environment 30 $python -c "
import json, sys, torch
from hesscale.experiments.io import environment_record
assert torch.cuda.is_available(), 'no CUDA device'
json.dump(environment_record(), open(sys.argv[1], 'w'), indent=1)
print(open(sys.argv[1]).read())" "$out/env.json"
section tests 80 $python -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_attention.py tests/test_mixed_precision.py tests/test_rules.py tests/test_properties.py
cp "$log" "$out/tests.log"  # the log so far: environment and tests
model_cost="$python benchmarks/model_cost.py --device cuda --autocast bf16 --rounds 5 --update-every 1 10 --clip-scale"
section gpt2 130 $model_cost --models hf-gpt2 --batch 8 --context 1024 --attention flash \
  --curvlinops --precision --json "$out/gpt2.json"
section resnet50 80 $model_cost --models resnet50 --batch 128 --channels-last --settings \
  --no-adahessian --json "$out/resnet50.json"
section vit_b_16 70 $model_cost --models vit_b_16 --batch 128 --attention flash --no-adahessian \
  --json "$out/vit_b_16.json"
section profile 50 $python benchmarks/profile_estimate.py --model hf-gpt2 --batch 8 --context 1024 \
  --device cuda --autocast bf16 --attention flash --json "$out/profile.json" \
  --table "$out/profile.txt"
$python benchmarks/gpu_table.py "$out" | tee -a "$log"
