"""
Residual networks and transformers
==================================

The engine runs on autograd's own graph of the backward pass, so any ``forward`` over
supported operations works: residual additions, gates, ``nn.TransformerEncoderLayer``,
attention. A tensor used several times gets the sum of its consumers' curvature.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.reference import exact_hessian_diagonal


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))  # pre-norm residual block


class Net(torch.nn.Module):
    def __init__(self, width=8, classes=5):
        super().__init__()
        self.embed = torch.nn.Linear(4, width)
        self.blocks = torch.nn.Sequential(Block(width), Block(width))
        self.attention = torch.nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):  # x: (batch, tokens, 4)
        h = self.attention(self.blocks(self.embed(x)))
        return self.head(h.mean(1))


torch.manual_seed(0)
model = Net().double()
x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
loss_fn = torch.nn.CrossEntropyLoss()
_, diag = hesscale.diagonal(model, loss_fn, x, y, method="hesscale")
with sdpa_kernel(SDPBackend.MATH):  # torch.func differentiates the math kernel twice
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
total = sum(float((diag[n] - exact[n]).abs().sum()) for n in exact)
reference = sum(float(e.abs().sum()) for e in exact.values())
print(f"HesScale: L1 error / Σ|diag H| = {total / reference:.3f}")
print("head exact:", torch.allclose(diag["head.weight"], exact["head.weight"]))
