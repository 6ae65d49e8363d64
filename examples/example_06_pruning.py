"""
Pruning and continual learning
==============================

``hesscale.importance`` turns any estimate into scores (here Optimal Brain Damage,
``½|h|θ²``), ``hesscale.prune`` removes the lowest-scoring weights through
``torch.nn.utils.prune``, and ``hesscale.ImportancePenalty`` holds important weights near
their values while a model learns a new task (EWC).
"""

import torch

import hesscale
from hesscale.pruning import sparsity_of

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
loss_fn = torch.nn.CrossEntropyLoss()
task_a = [(torch.randn(64, 10), torch.randint(0, 3, (64,))) for _ in range(4)]

scores = hesscale.importance(
    model, loss_fn, task_a, method="hesscale", criterion="obd", progress=False
)
masks = hesscale.prune(model, scores, sparsity=0.8)
print(f"sparsity of the Linear weights: {sparsity_of(model):.2f}")

penalty = hesscale.ImportancePenalty(model, strength=100.0)
penalty.consolidate(
    hesscale.importance(model, loss_fn, task_a, "hesscale_gn", "curvature", progress=False)
)
x_b, y_b = torch.randn(64, 10), torch.randint(0, 3, (64,))  # the next task
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(20):
    opt.zero_grad()
    loss = loss_fn(model(x_b), y_b) + penalty()
    loss.backward()
    opt.step()
print(f"penalty after 20 steps on the next task: {penalty().item():.4f}")
print(f"still sparse: {sparsity_of(model):.2f}")
