"""
Uncertainty: a Laplace posterior for a trained ResNet
=====================================================

``hesscale.laplace.HesScaleBackend`` makes hesscale a backend of laplace-torch
(``pip install "hesscale[laplace]"``): the posterior precision of every weight of a network is
its HesScaleGN curvature plus the prior's, at about the cost of one backward pass per batch —
for any model, BatchNorm included. Here a small ResNet learns to tell the orientation of noisy
bars; on bars rotated by 35° (a shift it never saw) the MAP network stays confident and wrong,
while the Laplace posterior's predictive (the linearised network's, with the prior precision
that maximises the marginal likelihood) knows less and says so: its negative log-likelihood
there comes close to that of a uniform guess (log 3 ≈ 1.10). The price is humility on the test
images: a diagonal posterior over all weights ignores how the weights co-vary, and its
predictive is less confident than the network's accuracy warrants. The reliability diagrams
show both: confidence against accuracy per bin, and the expected calibration error (ECE).
"""

import sys
import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:  # laplace-torch imports torchvision; where its wheel's operators were built for CUDA on a
    import torchvision  # noqa: F401  CPU torch (this project's CI), one module is stubbed out
except RuntimeError:
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")

from laplace import Laplace  # noqa: E402

from hesscale.experiments.calibration import calibration_metrics, reliability, rotate  # noqa: E402
from hesscale.laplace import HesScaleBackend  # noqa: E402

torch.manual_seed(0)


def bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16×16 images of one bar, horizontal (0), vertical (1) or diagonal (2), in noise."""
    y = torch.randint(0, 3, (n,), generator=generator)
    grid = torch.arange(16.0)
    rows, cols = grid.view(16, 1), grid.view(1, 16)
    offset = torch.randint(4, 12, (n, 1, 1), generator=generator).float()
    shape = (n, 16, 16)
    line = torch.stack(
        [
            ((rows - offset).abs() < 1.5).expand(shape),
            ((cols - offset).abs() < 1.5).expand(shape),
            ((rows - cols - offset + 8).abs() < 1.5).expand(shape),
        ]
    )  # (3, n, 16, 16)
    images = line[y, torch.arange(n)].float() + 1.0 * torch.randn(n, 16, 16, generator=generator)
    return images.unsqueeze(1), y


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    Block(8),
    nn.MaxPool2d(2),
    Block(8),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, 3),
)
g = torch.Generator().manual_seed(0)
train_x, train_y = bars(2048, g)
valid_x, valid_y = bars(128, g)
test_x, test_y = bars(256, g)
loader = DataLoader(TensorDataset(train_x, train_y), batch_size=64, shuffle=True)

opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
for _ in range(6):  # the MAP network
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
model.eval()

la = Laplace(
    model,
    "classification",
    subset_of_weights="all",
    hessian_structure="diag",
    backend=HesScaleBackend,  # HesScaleGN: every weight's curvature in one backward pass
)
la.fit(DataLoader(TensorDataset(train_x, train_y), batch_size=256))
# laplace-torch's default: the prior precision that maximises the marginal likelihood
la.optimize_prior_precision(method="marglik")
print(f"prior precision {la.prior_precision.item():.3g} (maximises the marginal likelihood)")

shifted_x = rotate(test_x, 35.0)
results = {}
for data, x in (("test", test_x), ("rotated 35°", shifted_x)):
    with torch.no_grad():
        map_probs = torch.softmax(model(x), -1)
    la_probs = torch.cat(
        [la(x[i : i + 64], pred_type="glm", link_approx="probit") for i in range(0, len(x), 64)]
    )
    for method, probs in (("MAP", map_probs), ("Laplace (HesScaleGN)", la_probs)):
        results[data, method] = probs
        m = calibration_metrics(probs, test_y)
        print(
            f"{data:<12} {method:<21} accuracy {m['accuracy']:.3f}  NLL {m['nll']:.3f}  "
            f"ECE {m['ece']:.3f}  Brier {m['brier']:.3f}"
        )

fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
for ax, data in zip(axes, ("test", "rotated 35°")):
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    for method, marker in (("MAP", "o"), ("Laplace (HesScaleGN)", "s")):
        probs = results[data, method]
        confidence, accuracy, count = reliability(probs, test_y, bins=10)
        keep = count > 0
        ece = calibration_metrics(probs, test_y, bins=10)["ece"]
        ax.plot(confidence[keep], accuracy[keep], marker=marker, label=f"{method}, ECE {ece:.3f}")
    ax.set_title(f"{data} images")
    ax.set_xlabel("confidence (bins of 0.1)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("accuracy in the bin")
fig.suptitle("Reliability of a small ResNet before (MAP) and after the Laplace approximation")
fig.tight_layout()
fig.savefig("laplace_calibration.png", dpi=100)
print("written: laplace_calibration.png")
