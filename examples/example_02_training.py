"""
AdaHesScale in a training loop
==============================

The curvature optimizers are drop-in replacements for ``torch.optim.Adam``: extend the model
once, then write the usual loop. The optimizer asks the next backward pass for its estimate;
``delta`` bounds the quadratic model's predicted change of the loss per step (the paper
authors' step-size scaling), and a guard refuses an update that is not finite.
"""

import torch

import hesscale
from hesscale.optim import AdaHesScale, Adam

torch.manual_seed(0)
x = torch.randn(512, 8)
y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()  # 4 classes


def train(optimizer_class, **kwargs):
    torch.manual_seed(1)
    model = hesscale.extend(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    )
    opt = optimizer_class(model.parameters(), **kwargs)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(200):
        batch = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
    return loss_fn(model(x), y).item()


print(f"Adam        final loss {train(Adam, lr=1e-2):.3f}")
print(f"AdaHesScale final loss {train(AdaHesScale, lr=1e-2, delta=0.5):.3f}")
