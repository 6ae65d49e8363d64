#!/usr/bin/env bash
# The prepared device check of issue #6, for a machine with a CUDA GPU (about 5 minutes):
# the ground-truth tests parametrized over devices, then the Fig. 2 and step-cost ratios to Adam
# on the GPU. Writes logs and JSON to ${OUT:-gpu_check}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)"
python -m pytest -q -k "cuda" tests/test_rules.py tests/test_properties.py 2>&1 | tee "$out/tests.log"
python benchmarks/step_cost.py --device cuda --rounds 20 --problems fmnist_2c2d cifar10_3c3d \
  --json "$out/step_cost.json" 2>&1 \
  | tee "$out/step_cost.log"
python -m hesscale.cli reproduce fig2 --device cuda --out "$out/fig2" --rounds 30 2>&1 \
  | tail -20 | tee "$out/fig2.log"
if python -c "import transformers" 2>/dev/null; then
  python benchmarks/hf_cost.py --device cuda --context 512 --batch 8 --rounds 10 2>&1 \
    | tee "$out/hf_cost.log"
fi
