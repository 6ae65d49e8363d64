"""
A Hessian diagonal for one batch
================================

``hesscale.diagonal`` returns one batch's estimate of every parameter's Hessian diagonal,
shaped like the parameters. On a small network we can compare it with the exact diagonal
(``hesscale.reference``, dense, float64): the last layer is exact, the others are HesScale's
approximation, and the squared gradient (Adam's curvature) is far off.
"""

import torch

import hesscale
from hesscale.reference import exact_hessian_diagonal

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(6, 16),
    torch.nn.Tanh(),
    torch.nn.Linear(16, 16),
    torch.nn.Tanh(),
    torch.nn.Linear(16, 10),
).double()
loss_fn = torch.nn.CrossEntropyLoss()
x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 10, (64,))

exact = exact_hessian_diagonal(model, loss_fn, x, y)
for method in ("hesscale", "hesscale_gn", "grad_sq"):
    model.zero_grad()
    loss, diag = hesscale.diagonal(model, loss_fn, x, y, method=method)
    errors = {
        name: float((diag[name] - exact[name]).abs().sum() / exact[name].abs().sum())
        for name in exact
    }
    print(f"{method:<12}", "  ".join(f"{n}: {e:.3f}" for n, e in errors.items()))
