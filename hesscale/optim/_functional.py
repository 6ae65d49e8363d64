"""The update shared by every optimizer of :mod:`hesscale.optim`: Adam with a curvature estimate.

Algorithm 2 of the paper, generalised so that the Adam-style, Newton-style and AdaHessian
variants are one function:

.. math::
    g_t &\\leftarrow g_t + \\lambda \\theta_{t-1}            &&\\text{(L2 weight decay)}\\\\
    \\theta_{t-1} &\\leftarrow (1 - \\alpha\\lambda)\\,\\theta_{t-1}  &&\\text{(or decoupled)}\\\\
    m_t &\\leftarrow \\beta_1 m_{t-1} + (1-\\beta_1)\\, g_t \\\\
    v_t &\\leftarrow \\beta_2 v_{t-1} + (1-\\beta_2)\\, u_t,\\quad
        u_t = S_t^2 \\text{ (squared)} \\text{ or } S_t \\text{ (Newton)}
        &&\\text{(only on steps with an estimate } S_t)\\\\
    \\theta_t &\\leftarrow \\theta_{t-1} - \\frac{\\alpha\\, m_t / (1-\\beta_1^t)}
        {\\left(v_t / (1-\\beta_2^{\\tau}) + \\epsilon_{root}\\right)^{p} + \\epsilon}

with ``τ`` the number of curvature updates so far. AdaHesScale: ``S`` the HesScale estimate,
squared, ``p = 1/2``; with ``S = |g|`` this is exactly ``torch.optim.Adam``. The paper's
Algorithm 2 writes ``ε`` inside the square root (``eps=0, eps_root=1e-8``); the authors' code and
torch's Adam put it outside (the default here).
"""

from __future__ import annotations

from torch import Tensor


def curvature_adam(
    params: list[Tensor],
    grads: list[Tensor],
    estimates: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    curvature_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eps_root: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    squared: bool,
    power: float,
    maximize: bool = False,
) -> None:
    """Apply the update above in place to ``params`` and their state tensors.

    ``estimates[i]`` is None on steps without a curvature estimate (``update_every > 1``); then
    ``v`` keeps its value. ``steps`` and ``curvature_steps`` are the counts after this step.
    """
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg, exp_avg_sq, estimate = exp_avgs[i], exp_avg_sqs[i], estimates[i]
        exp_avg.lerp_(grad, 1 - beta1)
        if estimate is not None:
            if squared:
                exp_avg_sq.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
            else:
                exp_avg_sq.mul_(beta2).add_(estimate, alpha=1 - beta2)
        bias_correction1 = 1 - beta1 ** steps[i]
        bias_correction2 = 1 - beta2 ** curvature_steps[i]
        step_size = lr / bias_correction1
        if power == 0.5 and eps_root == 0:  # the operations of torch.optim.Adam, in its order
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        else:
            denom = (exp_avg_sq / bias_correction2).add_(eps_root).pow_(power).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
