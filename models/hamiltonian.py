"""The Hamiltonian flow of HVAE (Caterini et al. 2018): K leapfrog steps with quadratic tempering.

This is the one place where the integrator lives. It is a pure function of a potential-gradient
callable, so it is tested on analytic targets (tests/models/test_hamiltonian.py) as well as on the decoder.

method.md, "Hamiltonian part". With U(z) = -log p(x|z) - log N(z; 0, I), each step k = 1..K is

    rho'   = rho - eps/2 * dU(z)
    z      = z + eps * rho'
    rho''  = rho' - eps/2 * dU(z)
    rho    = sqrt(beta_{k-1} / beta_k) * rho''          (tempering)

with 1/sqrt(beta_k) = (1 - 1/sqrt(beta0)) * (k/K)^2 + 1/sqrt(beta0), so beta_K = 1.

The gradient at the end of step k is the gradient at the start of step k+1 (same z; tempering only
rescales rho), so it is computed once: K + 1 gradient evaluations instead of the authors' 2K, with
identical results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

# A potential's gradient at z: returns (dU/dz with z's shape, auxiliary output of that evaluation,
# e.g. the decoder logits at z, so the caller can reuse the last decode).
PotentialGrad = Callable[[Tensor], tuple[Tensor, Any]]


def inv_sqrt_beta(k: int, n_steps: int, sqrt_beta0: float) -> float:
    """1 / sqrt(beta_k) of the quadratic tempering schedule; equals 1/sqrt(beta0) at k=0 and 1 at k=K."""
    return (1.0 - 1.0 / sqrt_beta0) * (k / n_steps) ** 2 + 1.0 / sqrt_beta0


def tempering_factor(k: int, n_steps: int, sqrt_beta0: float) -> float:
    """sqrt(beta_{k-1} / beta_k): the factor applied to the momentum at the end of step k (1-based)."""
    return inv_sqrt_beta(k, n_steps, sqrt_beta0) / inv_sqrt_beta(k - 1, n_steps, sqrt_beta0)


@dataclass
class FlowState:
    """Result of the flow: final position and momentum, the gradient there and its auxiliary output."""

    z: Tensor  # (B, D)
    rho: Tensor  # (B, D)
    grad: Tensor  # dU/dz at z
    aux: Any  # what grad_u returned alongside, evaluated at the final z


def leapfrog_flow(
    z: Tensor,
    rho: Tensor,
    grad_u: PotentialGrad,
    *,
    n_steps: int,
    step_size: float,
    sqrt_beta0: float = 1.0,
    tempering: bool = True,
    initial: tuple[Tensor, Any] | None = None,
) -> FlowState:
    """Run ``n_steps`` tempered leapfrog steps from (z, rho).

    Args:
        z, rho: start position and momentum, (B, D).
        grad_u: z -> (dU/dz, aux). For training it must build a graph (create_graph=True) so the loss
            can be differentiated through the flow (second-order gradients).
        sqrt_beta0: sqrt of the initial inverse temperature; ignored when ``tempering`` is False.
        initial: grad_u(z) if the caller already has it (saves one evaluation).
    """
    g, aux = initial if initial is not None else grad_u(z)
    for k in range(1, n_steps + 1):
        rho = rho - 0.5 * step_size * g
        z = z + step_size * rho
        g, aux = grad_u(z)
        rho = rho - 0.5 * step_size * g
        if tempering:
            rho = tempering_factor(k, n_steps, sqrt_beta0) * rho
    return FlowState(z=z, rho=rho, grad=g, aux=aux)
