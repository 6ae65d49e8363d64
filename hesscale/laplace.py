"""hesscale as a backend of laplace-torch: diagonal Laplace approximations of any model.

``laplace-torch`` (``pip install "hesscale[laplace]"``) turns a trained network into a Gaussian
posterior whose precision is the curvature of the negative log likelihood plus the prior's.
:class:`HesScaleBackend` is its ``CurvatureInterface`` for the diagonal structure; use it as

.. code-block:: python

    from laplace import Laplace
    from hesscale.laplace import HesScaleBackend

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 backend=HesScaleBackend, backend_kwargs={"method": "hesscale_gn"})
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x, pred_type="glm", link_approx="probit")

For a batch it returns laplace-torch's two quantities: the loss ``c · Σ_n ℓ(f(x_n), y_n)`` and
the diagonal ``c · diag ∇²_θ Σ_n ℓ(f(x_n), y_n)`` of its curvature, with laplace-torch's
losses and conventions (``ℓ`` the cross-entropy, ``c = 1``, for classification; the squared
error, ``c = ½``, for regression: the Gaussian likelihood of unit variance), by one call of
:func:`hesscale.diagonal` (one forward and one backward pass, whatever the model).

``method`` chooses the estimate of the curvature, which must be a valid precision (``≥ 0``):

- ``"hesscale_gn"`` (default): HesScaleGN, the deterministic Gauss-Newton diagonal of the
  HesScale recursion, ``≥ 0`` for these (convex) losses; exact for the last layer and for
  networks whose hidden layers have width one;
- ``"ggn_mc"``: GGN-MC, the Gauss-Newton diagonal from ``samples`` labels drawn from the model
  (the Monte-Carlo Fisher, laplace-torch's ``stochastic=True``), by the engine;
- ``"fisher"``: the same quantity by ``torch.func``, for models the engine's per-example rules
  refuse; ``"empirical_fisher"``: ``Σ_n g_n ⊙ g_n`` at the data's labels;
- ``"hesscale"`` (and ``"bl89"``, ``"exact"``, ``"hutchinson"``): these keep the second-order
  terms of the network and can give negative entries, which a precision cannot have; they are
  refused unless ``negative="clip"`` asks to clip them to zero (each batch's diagonal, as the
  backend sees one batch at a time; the user's choice).

Last-layer Laplace (``subset_of_weights="last_layer"``) estimates the last layer alone from the
features (exact with the default method); diagonal subnetworks select their entries; models
that take dicts (Hugging Face, ``dict_key_x``) are called with the dict. laplace-torch's
``kron`` and ``full`` structures need matrices a diagonal backend cannot give: they raise an
error that names the backends that give them.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.curvature import GGNInterface
from torch import nn

from .estimators import diagonal

#: methods whose estimates are non-negative for laplace-torch's losses
NON_NEGATIVE = ("hesscale_gn", "ggn_mc", "fisher", "empirical_fisher")
#: methods that can give negative entries (allowed with ``negative="clip"``)
SIGNED = ("hesscale", "bl89", "exact", "hutchinson")


class _SequenceLoss(nn.Module):
    """laplace-torch's summed loss over outputs of any shape ``(..., C)``: classification
    flattens the leading dimensions (a language model's tokens), as its BackPACK backend does."""

    def __init__(self, loss: nn.Module, classification: bool):
        super().__init__()
        self.loss, self.classification = loss, classification

    def forward(self, output, target):
        if self.classification and output.dim() > 2:
            return self.loss(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return self.loss(output, target)


class HesScaleBackend(GGNInterface):
    """laplace-torch's ``CurvatureInterface`` on hesscale's estimates (see the module docstring):
    a Gauss-Newton interface (``GGNInterface``, which laplace-torch's subnetworks ask for), whose
    Jacobians for the GLM predictive are laplace-torch's own (``torch.func``).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as
            laplace-torch passes them.
        method: the estimate (``"hesscale_gn"`` by default; see the module docstring).
        samples: Monte-Carlo samples of ``"ggn_mc"`` and ``"fisher"``.
        generator: a ``torch.Generator`` that makes the sampled estimates repeatable.
        negative: ``"refuse"`` (default) or ``"clip"``: what to do with a method that can give
            negative entries.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        method: str = "hesscale_gn",
        samples: int = 1,
        generator: torch.Generator | None = None,
        negative: str = "refuse",
    ):
        if negative not in ("refuse", "clip"):
            raise ValueError(f"negative must be 'refuse' or 'clip', got {negative!r}")
        if method in SIGNED and negative == "refuse":
            raise ValueError(
                f"method {method!r} can give negative curvature entries, which a Laplace "
                "posterior's precision cannot have: use 'hesscale_gn' (the default, "
                "non-negative), or pass negative='clip' to clip them to zero"
            )
        if method not in NON_NEGATIVE + SIGNED:
            raise ValueError(
                f"method {method!r} is not a curvature of the summed loss; choose one of "
                f"{list(NON_NEGATIVE)} (or {list(SIGNED)} with negative='clip')"
            )
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic=method in ("ggn_mc", "fisher"),
            num_samples=samples,
        )
        self.method, self.samples, self.generator = method, samples, generator
        self.clip = negative == "clip"
        self._loss = _SequenceLoss(self.lossfunc, likelihood == "classification")

    def diag(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        y: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c · loss, c · diag ∇²loss)`` of the batch, the diagonal flattened in the order of
        the (last layer's, or the subnetwork's) parameters."""
        if self.last_layer:
            with torch.no_grad():
                output, features = self.model.forward_with_features(x)
                if self.model.last_layer(features).shape != output.shape:
                    raise ValueError(
                        "last-layer Laplace: the model's output is not its last layer's (it "
                        f"pools or reshapes {tuple(self.model.last_layer(features).shape)} into "
                        f"{tuple(output.shape)}, as Hugging Face's sequence classifiers do); use "
                        "subset_of_weights='all'"
                    )
            model, inputs = self.model.last_layer, features.detach()
        else:
            model, inputs = self.model, x
        # the engine's deterministic methods differentiate any loss function; the sampled and
        # per-example ones need laplace-torch's loss module itself
        loss_fn = (
            self._loss if self.method in ("hesscale_gn", "hesscale", "bl89") else self.lossfunc
        )
        loss, estimates = diagonal(
            model,
            loss_fn,
            inputs,
            y,
            method=self.method,
            samples=self.samples,
            generator=self.generator,
        )
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        H = torch.cat([estimates[name].detach().reshape(-1) for name in names])
        if self.clip:
            H = H.clamp(min=0)
        if self.subnetwork_indices is not None:
            H = H[self.subnetwork_indices]
        return self.factor * loss.detach(), self.factor * H

    def kron(self, x, y, N, **kwargs):
        raise NotImplementedError(
            "HesScaleBackend gives diagonals (hessian_structure='diag'); for "
            "hessian_structure='kron' use laplace-torch's CurvlinopsGGN or AsdlGGN backend"
        )

    def full(self, x, y, **kwargs):
        raise NotImplementedError(
            "HesScaleBackend gives diagonals (hessian_structure='diag'); for "
            "hessian_structure='full' (and full subnetworks) use laplace-torch's CurvlinopsGGN "
            "backend"
        )
