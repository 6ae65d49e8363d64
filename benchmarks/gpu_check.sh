#!/usr/bin/env bash
# The prepared device check for a machine with a CUDA GPU (about 10 minutes): the ground-truth
# tests parametrized over devices, then the Fig. 2 and step-cost ratios to Adam, the engine's
# cost over a plain forward+backward, and ResNet-18 / GPT-2-shaped steps, on the GPU.
# Writes logs and JSON to ${OUT:-gpu_check}/.
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
python benchmarks/model_cost.py --models resnet18 --device cuda --rounds 5 --settings \
  --json "$out/model_cost_resnet18.json" 2>&1 | tee "$out/model_cost_resnet18.log"
python benchmarks/model_cost.py --models gpt2 --device cuda --batch 8 --context 512 --rounds 5 \
  --json "$out/model_cost_gpt2.json" 2>&1 | tee "$out/model_cost_gpt2.log"
python benchmarks/engine_cost.py --device cuda --rounds 10 --networks "L=4" "L=16" residual \
  --json "$out/engine_cost.json" 2>&1 | tee "$out/engine_cost.log"
