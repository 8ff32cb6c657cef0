"""The deterministic ODE solvers against diffusers' Flow-DPMSolver and against exact toy flows."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from raygrpo.sampling.flow import ode_step, sigma_schedule
from raygrpo.sampling.ode import ODE_SOLVERS, DPMSolverPP2M, EulerSolver, dpm_flow_sigmas, make_ode_solver

# Sana's "Flow-DPMSolver" as DGPO configures it.
FLOW_DPM_CONFIG = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    final_sigmas_type="zero",
    lower_order_final=True,
)


def _flow_dpm_scheduler(num_steps: int, shift: float = 3.0) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler(**{**FLOW_DPM_CONFIG, "flow_shift": shift})
    scheduler.set_timesteps(num_steps)
    return scheduler


def _run(solver, x, velocity, sigmas, num_steps=None):
    """A sampling loop (all steps unless ``num_steps``); ``velocity(x, sigma)`` stands in for the network."""
    for i in range(len(sigmas) - 1 if num_steps is None else num_steps):
        x = solver.step(x, velocity(x, float(sigmas[i])), i)
    return x


# --- toy velocity fields -------------------------------------------------------------------------------


def _point_mass_velocity(x0):
    """Exact velocity when the data is the single point x0: x = (1-s) x0 + s eps => eps - x0 = (x - x0)/s."""
    return lambda x, sigma: (x - x0) / sigma


def _two_gaussian_velocity(mu, tau):
    """Exact velocity for data 1/2 N(mu, tau^2 I) + 1/2 N(-mu, tau^2 I) (float64).

    Given component k, x_s ~ N((1-s) m_k, var I) with var = (1-s)^2 tau^2 + s^2, and E[x0 | x, k] =
    m_k + (1-s) tau^2 / var * d_k with d_k = x - (1-s) m_k. The velocity E[eps - x0 | x] = (x - E[x0|x]) / s
    simplifies per component to d_k (s - (1-s) tau^2) / var - m_k (no division by s, so sigma = 0 is fine),
    averaged with the posterior component weights. Narrow-but-not-point components: with point masses
    the endpoint snaps onto an atom and hides the trajectory error this toy is meant to expose.
    """

    def velocity(x, sigma):
        x = x.double()
        var = (1 - sigma) ** 2 * tau**2 + sigma**2
        means = torch.stack([mu, -mu])  # [2, D]
        d = x[:, None, :] - (1 - sigma) * means  # [B, 2, D]
        weights = torch.softmax(-(d**2).sum(-1) / (2 * var), dim=1)  # [B, 2]
        v_k = d * (sigma - (1 - sigma) * tau**2) / var - means  # [B, 2, D]
        return (weights[..., None] * v_k).sum(1).float()

    return velocity


def _rk4_reference(x, velocity, sigma_from, sigma_to, num_steps):
    """Classical RK4 in sigma, float64: the 'exact' flow the few-step solvers are judged against."""
    x = x.double()
    grid = torch.linspace(sigma_from, sigma_to, num_steps + 1, dtype=torch.float64).tolist()
    f = lambda y, s: velocity(y, s).double()  # noqa: E731
    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _rms(a, b):
    return (a.double() - b.double()).pow(2).sum(-1).mean().sqrt().item()


# --- 1. the sigma grid ------------------------------------------------------------------------------------


def test_dpm_flow_sigmas_is_dgpo_grid_and_diffusers_grid():
    sigmas = dpm_flow_sigmas(10, 3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    dgpo = torch.tensor([0.9997, 0.964, 0.923, 0.875, 0.818, 0.750, 0.666, 0.562, 0.428, 0.250, 0.0])
    assert torch.allclose(sigmas, dgpo, atol=1.5e-3, rtol=0)
    assert sigmas[-1] == 0.0 and sigmas[0] < 1.0
    for num_steps, shift in [(10, 3.0), (1, 3.0), (6, 3.0), (20, 3.0), (28, 1.0), (50, 4.5)]:
        assert torch.equal(dpm_flow_sigmas(num_steps, shift), _flow_dpm_scheduler(num_steps, shift).sigmas)
    with pytest.raises(ValueError, match="num_steps"):
        dpm_flow_sigmas(0, 3.0)


# --- 2. DPM-Solver++(2M) equals diffusers step for step ---------------------------------------------------


def _linear_velocity(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 8, generator=gen) / 4
    b = torch.randn(8, generator=gen)
    return lambda x, sigma: x @ a.T + (1 - sigma) * b


def _nonlinear_velocity(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=gen) / 3
    b = torch.randn(8, generator=gen)
    return lambda x, sigma: torch.tanh(x @ w.T) * (1 + sigma) + sigma * b - 0.5 * x


@pytest.mark.parametrize("num_steps", [10, 4, 20])
@pytest.mark.parametrize("field", ["point_mass", "linear", "nonlinear"])
def test_dpmpp_2m_matches_diffusers_scheduler(num_steps, field):
    gen = torch.Generator().manual_seed(num_steps)
    x_noise = torch.randn(4, 8, generator=gen)
    velocity = {
        "point_mass": _point_mass_velocity(torch.randn(1, 8, generator=gen)),
        "linear": _linear_velocity(1),
        "nonlinear": _nonlinear_velocity(2),
    }[field]
    scheduler = _flow_dpm_scheduler(num_steps)
    sigmas = dpm_flow_sigmas(num_steps, 3.0)
    assert torch.equal(sigmas, scheduler.sigmas)
    solver = DPMSolverPP2M(sigmas)
    ours, theirs = x_noise.clone(), x_noise.clone()
    worst = 0.0
    for i, t in enumerate(scheduler.timesteps):
        # Each side is fed the velocity at its own state, so any drift would compound through the loop.
        theirs = scheduler.step(velocity(theirs, float(sigmas[i])), t, theirs).prev_sample
        ours = solver.step(ours, velocity(ours, float(sigmas[i])), i)
        assert ours.dtype == torch.float32
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst < 1e-5, worst


# --- 3. exactness and accuracy on toys with known flows ---------------------------------------------------


@pytest.mark.parametrize("sigmas", [dpm_flow_sigmas(6, 3.0), sigma_schedule(6, 3.0)], ids=["dpm_grid", "from_sigma_1"])
@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_point_mass_lands_on_the_point(name, sigmas):
    gen = torch.Generator().manual_seed(0)
    x0_true = torch.randn(1, 16, generator=gen)
    x = _run(make_ode_solver(name, sigmas), torch.randn(5, 16, generator=gen), _point_mass_velocity(x0_true), sigmas)
    assert torch.allclose(x, x0_true.expand_as(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def two_gaussians():
    gen = torch.Generator().manual_seed(0)
    velocity = _two_gaussian_velocity(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.5)
    return velocity, torch.randn(64, 2, generator=gen)


def test_second_order_beats_euler_end_to_end(two_gaussians):
    velocity, x_noise = two_gaussians
    sigmas = dpm_flow_sigmas(6, 1.0)  # evenly spaced: the last (first-order) jump is short
    exact = _rk4_reference(x_noise, velocity, float(sigmas[0]), 0.0, 400)
    err = {name: _rms(_run(make_ode_solver(name, sigmas), x_noise, velocity, sigmas), exact) for name in ODE_SOLVERS}
    assert err["euler"] / err["dpmpp_2m"] > 2.0, err  # measured ~3.1


def test_second_order_beats_euler_on_dgpo_grid(two_gaussians):
    # On the shift-3 grid the forced first-order jump 0.375 -> 0 dominates both endpoints in a 2-D toy,
    # so judge the multistep part: the state just before that last step.
    velocity, x_noise = two_gaussians
    sigmas = dpm_flow_sigmas(6, 3.0)
    exact = _rk4_reference(x_noise, velocity, float(sigmas[0]), float(sigmas[-2]), 200)
    err = {name: _rms(_run(make_ode_solver(name, sigmas), x_noise, velocity, sigmas, 5), exact) for name in ODE_SOLVERS}
    assert err["euler"] / err["dpmpp_2m"] > 2.0, err  # measured ~2.7


# --- 4. Euler, call order, edge cases, factory ------------------------------------------------------------


def test_euler_is_repeated_ode_step():
    gen = torch.Generator().manual_seed(3)
    sigmas = sigma_schedule(5, 3.0)
    solver, x = EulerSolver(sigmas), torch.randn(2, 4, 3, generator=gen)
    expected = x.clone()
    for i in range(5):
        v = torch.randn(2, 4, 3, generator=gen)
        x = solver.step(x, v, i)
        expected = ode_step(expected, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(x, expected)


def test_first_order_steps_equal_euler():
    # DPM-Solver++(1) in the flow parameterisation is the Euler step; so are the steps taken at first order.
    gen = torch.Generator().manual_seed(4)
    velocity = _nonlinear_velocity(5)
    for sigmas, first_order_steps in [(dpm_flow_sigmas(5, 3.0), (0, 4)), (sigma_schedule(5, 3.0), (0, 1, 4))]:
        dpm, euler = DPMSolverPP2M(sigmas), EulerSolver(sigmas)
        x = torch.randn(3, 8, generator=gen)
        for i in range(5):
            v = velocity(x, float(sigmas[i]))
            x_dpm, x_euler = dpm.step(x, v, i), euler.step(x, v, i)
            assert torch.isfinite(x_dpm).all()
            if i in first_order_steps:  # from sigma = 1 the multistep correction vanishes at step 1 too
                assert torch.allclose(x_dpm, x_euler, atol=1e-5, rtol=0), i
            else:
                assert not torch.allclose(x_dpm, x_euler, atol=1e-4, rtol=0), i
            x = x_dpm


def test_final_step_into_zero_returns_the_data_prediction():
    gen = torch.Generator().manual_seed(6)
    sigmas = dpm_flow_sigmas(3, 3.0)
    solver, velocity = DPMSolverPP2M(sigmas), _nonlinear_velocity(7)
    x = torch.randn(3, 8, generator=gen)
    for i in range(2):
        x = solver.step(x, velocity(x, float(sigmas[i])), i)
    v = velocity(x, float(sigmas[2]))
    assert torch.allclose(solver.step(x, v, 2), x - sigmas[2] * v, atol=1e-6, rtol=0)


def test_lower_order_final_on_a_grid_ending_above_zero():
    sigmas = dpm_flow_sigmas(8, 3.0)[:5]  # a partial trajectory ending at sigma > 0
    velocity = _nonlinear_velocity(8)
    x_noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    outs = {}
    for flag in (True, False):
        solver, x = DPMSolverPP2M(sigmas, lower_order_final=flag), x_noise.clone()
        for i in range(3):
            x = solver.step(x, velocity(x, float(sigmas[i])), i)
        v = velocity(x, float(sigmas[3]))
        outs[flag] = (solver.step(x, v, 3), ode_step(x, v, sigmas[3], sigmas[4]))
    assert torch.allclose(outs[True][0], outs[True][1], atol=1e-6, rtol=0)
    assert not torch.allclose(outs[False][0], outs[False][1], atol=1e-4, rtol=0)


def test_low_precision_inputs_give_float32():
    sigmas = dpm_flow_sigmas(4, 3.0)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(10))
    for name in ODE_SOLVERS:
        solver, y = make_ode_solver(name, sigmas), x.bfloat16()
        for i in range(4):
            y = solver.step(y, torch.ones_like(y), i)
            assert y.dtype == torch.float32


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_steps_must_run_in_order(name):
    sigmas = dpm_flow_sigmas(3, 3.0)
    solver, x = make_ode_solver(name, sigmas), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="expected 0"):
        solver.step(x, x, 1)
    solver.step(x, x, 0)
    with pytest.raises(RuntimeError, match="expected 1"):
        solver.step(x, x, 0)
    solver.step(x, x, 1)
    solver.step(x, x, 2)
    with pytest.raises(RuntimeError):
        solver.step(x, x, 3)


def test_batch_shape_change_mid_loop_raises():
    solver, x = DPMSolverPP2M(dpm_flow_sigmas(4, 3.0)), torch.zeros(2, 4)
    solver.step(x, x, 0)
    with pytest.raises(RuntimeError, match="batch shape"):
        solver.step(torch.zeros(3, 4), torch.zeros(3, 4), 1)


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.2, 0.5, 0.0]), torch.ones(2, 2)])
def test_bad_grids_are_rejected(bad):
    for cls in (EulerSolver, DPMSolverPP2M):
        with pytest.raises(ValueError):
            cls(bad)


def test_factory_names():
    sigmas = dpm_flow_sigmas(4, 3.0)
    assert ODE_SOLVERS == ("euler", "dpmpp_2m", "consistency")  # consistency: tests/test_rg_lcd.py
    assert isinstance(make_ode_solver("euler", sigmas), EulerSolver)
    assert isinstance(make_ode_solver("dpmpp_2m", sigmas), DPMSolverPP2M)
    assert make_ode_solver("dpmpp_2m", sigmas) is not make_ode_solver("dpmpp_2m", sigmas)
    with pytest.raises(ValueError, match="euler") as info:
        make_ode_solver("heun", sigmas)
    assert "dpmpp_2m" in str(info.value)
