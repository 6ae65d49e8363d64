"""The estimation methods of the engine: one code path, distinguished by two switches.

All three share the backpropagation rule of Eq. 4/8 of the paper,

    s_a = σ'(a)² ⊙ (Jᵀ∘² s_next) + [second_order_term] · σ''(a) ⊙ g_h,

and differ only in whether the σ'' term is kept and in how the curvature at the network output
is obtained.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import UnsupportedModuleError


@dataclass(frozen=True)
class Method:
    """Switches of the shared backpropagation rule.

    Attributes:
        name: the public name.
        second_order_term: keep the σ''(a) ⊙ g term of Eq. 4 (Hessian) or drop it (Gauss-Newton).
        exact_output: start from the exact diagonal of the loss Hessian with respect to the
            logits (HesScale, Appendix A). If False (BL89), a softmax output is treated as
            LogSoftmax followed by NLLLoss, with the diagonal rule applied through LogSoftmax as
            if it were element-wise (σ' = 1 − q, σ'' = q² − q).
        monte_carlo: instead of the HesScale rules, backpropagate sampled square-root factors of
            the loss Hessian and square per-example gradients (GGN-MC, see ``_ggn_mc``).
    """

    name: str
    second_order_term: bool
    exact_output: bool
    monte_carlo: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("hesscale", second_order_term=True, exact_output=True),
        Method("hesscale_gn", second_order_term=False, exact_output=True),
        Method("bl89", second_order_term=True, exact_output=False),
        Method("ggn_mc", second_order_term=False, exact_output=True, monte_carlo=True),
    )
}


def get_method(name: str) -> Method:
    """Look a backpropagated method up by name, with a clear error for unknown names."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnsupportedModuleError(
            f"unknown method {name!r}; the engine's methods are {sorted(METHODS)}"
        ) from None
