"""
Mixed precision and several processes
=====================================

Under ``torch.autocast`` the curvature pass runs, and the estimates are stored, in the
parameters' dtype. With ``DistributedDataParallel`` the optimizers average the estimates
across ranks as DDP averages gradients. This example runs one process (``gloo``, world size
1) so that it runs anywhere; ``torchrun --nproc-per-node 4`` runs the same code on 4.
"""

import os

import torch
import torch.distributed as dist

import hesscale
from hesscale.optim import AdaHesScale

torch.manual_seed(0)
model = hesscale.extend(
    torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
)
loss_fn = torch.nn.CrossEntropyLoss()
x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

# bfloat16 autocast: the forward runs in bfloat16, estimates come back in float32
opt = AdaHesScale(model.parameters(), lr=1e-3)
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = loss_fn(model(x), y)
loss.backward()
print("estimate dtype under autocast:", model[0].weight.hess_diag.dtype)
opt.step()

# data-parallel: gradients and estimates averaged across ranks
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("gloo", rank=0, world_size=1)
try:
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = AdaHesScale(model.parameters(), lr=1e-3)  # detects the process group
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
    print(f"loss after 3 data-parallel steps: {loss.item():.3f}")
finally:
    dist.destroy_process_group()
