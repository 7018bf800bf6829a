"""The leapfrog integrator on analytic targets: reversibility, energy error, the tempering schedule."""

import math

import pytest
import torch

from models.hamiltonian import inv_sqrt_beta, leapfrog_flow, tempering_factor


@pytest.fixture(autouse=True)
def float64():
    """Integrator properties are checked in double precision; the default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def gaussian_grad(precision: torch.Tensor):
    """U(z) = 0.5 z^T P z with P diagonal -> dU/dz = P z."""
    return lambda z: (precision * z, None)


def energy(z, rho, precision):
    return 0.5 * (precision * z * z).sum(1) + 0.5 * (rho * rho).sum(1)


def test_reversible_without_tempering():
    torch.manual_seed(0)
    p = torch.rand(8) + 0.5
    z0, rho0 = torch.randn(4, 8), torch.randn(4, 8)
    fwd = leapfrog_flow(z0, rho0, gaussian_grad(p), n_steps=10, step_size=0.1, tempering=False)
    back = leapfrog_flow(fwd.z, -fwd.rho, gaussian_grad(p), n_steps=10, step_size=0.1, tempering=False)
    torch.testing.assert_close(back.z, z0, atol=1e-12, rtol=0)
    torch.testing.assert_close(-back.rho, rho0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("eps", [0.1, 0.05, 0.025])
def test_energy_error_is_second_order(eps):
    """Leapfrog is symplectic and second order: the energy error after time T=1 scales like eps^2."""
    torch.manual_seed(1)
    p = torch.tensor([1.0, 4.0])
    z0, rho0 = torch.randn(16, 2), torch.randn(16, 2)
    n = round(1.0 / eps)
    out = leapfrog_flow(z0, rho0, gaussian_grad(p), n_steps=n, step_size=eps, tempering=False)
    e0 = energy(z0, rho0, p)
    rel = ((energy(out.z, out.rho, p) - e0).abs() / e0).max().item()
    # Harmonic oscillator: the modified energy differs by (eps * omega)^2 / 4 relative; omega_max = 2.
    assert 0.0 < rel < (eps * 2.0) ** 2 / 4 * 1.01


def test_energy_error_shrinks_with_step_size():
    p = torch.tensor([1.0, 4.0])
    z0, rho0 = torch.ones(1, 2), torch.ones(1, 2)
    errs = []
    for eps in (0.1, 0.05):
        out = leapfrog_flow(
            z0, rho0, gaussian_grad(p), n_steps=round(1 / eps), step_size=eps, tempering=False
        )
        errs.append((energy(out.z, out.rho, p) - energy(z0, rho0, p)).abs().item())
    assert 3.0 < errs[0] / errs[1] < 5.0  # halving eps divides the error by ~4


def test_tempering_schedule_endpoints_and_product():
    K, sb0 = 3, math.sqrt(0.3)
    assert inv_sqrt_beta(0, K, sb0) == pytest.approx(1 / sb0)
    assert inv_sqrt_beta(K, K, sb0) == pytest.approx(1.0)  # beta_K = 1
    prod = math.prod(tempering_factor(k, K, sb0) for k in range(1, K + 1))
    assert prod == pytest.approx(sb0)  # rho is scaled from 1/sqrt(beta0) back to unit temperature
    # method.md: 1/sqrt(beta_k) = (1 - 1/sqrt(beta0)) (k/K)^2 + 1/sqrt(beta0), hand-computed at k=1:
    assert inv_sqrt_beta(1, K, sb0) == pytest.approx((1 - 1 / sb0) / 9 + 1 / sb0)


def test_tempering_scales_momentum_without_gradient():
    """With a flat potential the flow only moves z and rescales rho by the tempering product."""
    z0, rho0 = torch.zeros(2, 3), torch.ones(2, 3) / 0.3
    flat = lambda z: (torch.zeros_like(z), None)  # noqa: E731
    out = leapfrog_flow(z0, rho0, flat, n_steps=3, step_size=0.5, sqrt_beta0=0.3)
    torch.testing.assert_close(out.rho, torch.ones(2, 3))


def test_gradient_evaluations_are_reused():
    calls = []

    def g(z):
        calls.append(1)
        return z, None

    leapfrog_flow(torch.zeros(1, 2), torch.ones(1, 2), g, n_steps=3, step_size=0.1)
    assert len(calls) == 4  # K + 1, not 2K
