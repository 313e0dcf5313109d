"""Samplers against closed forms: Gaussian data with analytic denoisers, exact steps, SDEdit starts.

For data ``x0 ~ N(mu, sd^2)`` per channel the conditional expectations ``E[noise - x0 | x_t]``
(flow) and ``E[eps | x_t]``, ``E[v | x_t]`` (DDPM) are linear in ``x_t`` (Gaussian conditioning),
so the samplers can be run with the exact optimal model. The probability-flow ODE then transports
noise ``z`` to ``mu + sd z`` (the monotone map between the two Gaussians), which the deterministic
samplers must reproduce per sample up to their discretisation error; the stochastic sampler must
reproduce mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from vdm.diffusion import (
    DDPMSchedule,
    alpha_sigma,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_time,
    ddpm_timesteps_from_time,
    euler_sample,
    expand_like,
    flow_interpolate,
    flow_timesteps,
    heun_sample,
    make_ddpm_schedule,
    q_sample,
    sample_flow_time,
    sdedit_ddpm_start,
    sdedit_flow_start,
    shift_timesteps,
    v_target,
)

# two channels: the suggested N(0.7, 0.3^2) and a wider one (sd > 1 flips the sign of the flow's
# x_t-coefficient at small t); 5000 x (1, 2, 2) positions -> 20000 samples per channel
MU = torch.tensor([0.7, -0.4], dtype=torch.float64).view(1, 2, 1, 1, 1)
SD = torch.tensor([0.3, 1.5], dtype=torch.float64).view(1, 2, 1, 1, 1)
SHAPE = (5000, 2, 1, 2, 2)
NUM_SAMPLES = SHAPE[0] * SHAPE[2] * SHAPE[3] * SHAPE[4]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small tensors and many steps: intra-op threads only add overhead (and contend on busy CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flow_oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact ``E[noise - x0 | x_t]`` for x_t = (1 - t) x0 + t noise."""
    t = expand_like(t, x).to(x.dtype)
    var = (1 - t) ** 2 * SD**2 + t**2  # Var[x_t]
    cov = t - (1 - t) * SD**2  # Cov[noise - x0, x_t]
    return -MU + cov / var * (x - (1 - t) * MU)


def ddpm_oracle(schedule: DDPMSchedule, prediction_type: str):
    """Exact ``E[eps | x_t]`` or ``E[v | x_t]``; the time input is mapped back to the DDPM index."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(schedule, ddpm_timesteps_from_time(t, schedule.num_train_steps))
        a, s = expand_like(alpha, x), expand_like(sigma, x)
        var = a**2 * SD**2 + s**2
        eps = s / var * (x - a * MU)
        x0 = MU + a * SD**2 / var * (x - a * MU)
        return eps if prediction_type == "eps" else a * eps - s * x0

    return denoise


def gaussian_noise(seed: int = 0) -> torch.Tensor:
    """Starting noise standardised per channel, so its exact transport has mean mu and std sd exactly."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mean, std = channel_stats(noise)
    return (noise - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(0, 2, 3, 4)), x.std(dim=(0, 2, 3, 4))


def assert_gaussian(x: torch.Tensor, mean_atol: torch.Tensor | float, std_rtol: float) -> None:
    """Per-channel mean within ``mean_atol`` of mu and std within ``std_rtol`` of sd."""
    mean, std = channel_stats(x)
    mu, sd = MU.flatten(), SD.flatten()
    assert torch.all((mean - mu).abs() < mean_atol), (mean, mu)
    assert torch.all((std / sd - 1).abs() < std_rtol), (std, sd)


def assert_transport(x: torch.Tensor, noise: torch.Tensor, atol: float) -> None:
    """Per-sample match with the exact transport ``mu + sd z`` of the starting noise."""
    err = (x - (MU + SD * noise)).abs().max().item()
    assert err < atol, err


# --- Gaussian data with exact denoisers --------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, num_steps, shift, atol",
    [
        (euler_sample, 200, 1.0, 0.06),
        (euler_sample, 400, 3.0, 0.06),
        (heun_sample, 20, 1.0, 0.03),
        (heun_sample, 40, 3.0, 0.06),
    ],
)
def test_flow_samplers_gaussian(sampler, num_steps: int, shift: float, atol: float) -> None:
    noise = gaussian_noise()
    x = sampler(flow_oracle, noise, num_steps, shift=shift)
    assert x.shape == noise.shape and x.dtype == torch.float64
    assert_transport(x, noise, atol)
    # the noise is standardised, so only the discretisation moves the moments
    assert_gaussian(x, mean_atol=0.005, std_rtol=0.04)


@pytest.mark.parametrize(
    "kind, zero_snr, prediction_type",
    [("cosine", False, "eps"), ("linear", False, "v"), ("cosine", True, "v"), ("scaled_linear", True, "v")],
)
def test_ddim_deterministic_gaussian(kind: str, zero_snr: bool, prediction_type: str) -> None:
    schedule = make_ddpm_schedule(kind, 1000, zero_terminal_snr=zero_snr)
    noise = gaussian_noise()
    model = ddpm_oracle(schedule, prediction_type)
    x = ddim_sample(model, schedule, noise, 200, prediction_type=prediction_type)
    assert_transport(x, noise, atol=0.08)
    assert_gaussian(x, mean_atol=0.005, std_rtol=0.05)


@pytest.mark.parametrize(
    "kind, zero_snr, prediction_type, num_steps",
    [("cosine", True, "v", 250), ("cosine", False, "eps", 250), ("linear", False, "eps", 500)],
)
def test_ddim_ancestral_gaussian(kind: str, zero_snr: bool, prediction_type: str, num_steps: int) -> None:
    schedule = make_ddpm_schedule(kind, 1000, zero_terminal_snr=zero_snr)
    noise = gaussian_noise()
    x = ddim_sample(
        ddpm_oracle(schedule, prediction_type),
        schedule,
        noise,
        num_steps,
        prediction_type=prediction_type,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    # 4 standard errors for the mean; 3% discretisation bias + 3 standard errors for the std
    standard_error = SD.flatten() / NUM_SAMPLES**0.5
    assert_gaussian(x, mean_atol=4 * standard_error, std_rtol=0.03 + 3 / (2 * NUM_SAMPLES) ** 0.5)
    # stochastic: far from the deterministic transport of its starting noise
    assert (x - (MU + SD * noise)).abs().max() > 1.0


# --- exact steps and call schedules --------------------------------------------------------------


class Recorder:
    """Wraps a denoiser and keeps every (x, t) it is called with."""

    def __init__(self, denoiser) -> None:
        self.denoiser = denoiser
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return self.denoiser(x, t)

    @property
    def times(self) -> list[float]:
        return [t[0].item() for _, t in self.calls]


def point_mass_velocity(target: torch.Tensor):
    """Exact flow velocity ``(x_t - x0) / t`` when the data is the single point ``target``."""
    return lambda x, t: (x - target) / expand_like(t, x).to(x.dtype)


@pytest.mark.parametrize("sampler, calls_per_step", [(euler_sample, 1), (heun_sample, 2)])
@pytest.mark.parametrize("num_steps", [1, 4])
def test_flow_samplers_exact_on_straight_paths(sampler, calls_per_step: int, num_steps: int) -> None:
    """Point-mass data makes every path straight, so any number of steps lands exactly on it."""
    gen = torch.Generator().manual_seed(3)
    target, noise = torch.randn(2, 3, 2, 4, 4, generator=gen, dtype=torch.float64).unbind(0)
    model = Recorder(point_mass_velocity(target))
    x = sampler(model, noise, num_steps, shift=2.0)
    torch.testing.assert_close(x, target, rtol=0, atol=1e-12)
    times = flow_timesteps(num_steps, shift=2.0, dtype=torch.float64).tolist()
    expected = []
    for t_cur, t_next in zip(times[:-1], times[1:]):
        # Heun evaluates the end of each step too, except at t = 0 (its last step is Euler)
        expected += [t_cur] if calls_per_step == 1 or t_next == 0 else [t_cur, t_next]
    assert model.times == pytest.approx(expected, abs=1e-12)
    assert all(t.shape == (3,) and t.dtype == torch.float64 for _, t in model.calls)
    torch.testing.assert_close(model.calls[0][0], noise, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_exact_for_point_mass(prediction_type: str, eta: float) -> None:
    """With the data a single point the exact denoiser recovers it at every step, so DDIM returns it."""
    schedule = make_ddpm_schedule("cosine", 1000)
    gen = torch.Generator().manual_seed(4)
    target, noise = torch.randn(2, 2, 3, 2, 2, generator=gen, dtype=torch.float64).unbind(0)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(schedule, ddpm_timesteps_from_time(t, schedule.num_train_steps))
        eps = (x - expand_like(alpha, x) * target) / expand_like(sigma, x)
        return eps if prediction_type == "eps" else v_target(target, eps, alpha, sigma)

    model = Recorder(denoise)
    x = ddim_sample(model, schedule, noise, 7, prediction_type=prediction_type, eta=eta, generator=gen)
    torch.testing.assert_close(x, target, rtol=0, atol=1e-9)
    steps = ddim_timesteps(1000, 7)
    assert model.times == pytest.approx(ddpm_time(steps, 1000, torch.float64).tolist(), abs=1e-12)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddim_step_deterministic_follows_forward_process(prediction_type: str) -> None:
    """eta = 0 with the true (x0, eps): the step lands exactly on q_sample at the previous index."""
    schedule = make_ddpm_schedule("scaled_linear", 1000)
    gen = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 2, 4, 3, 3, generator=gen, dtype=torch.float64).unbind(0)
    acp = schedule.alphas_cumprod
    i, j = torch.full((2,), 700), torch.full((2,), 300)
    x_i = q_sample(schedule, x0, eps, i)
    alpha, sigma = alpha_sigma(schedule, i)
    pred = eps if prediction_type == "eps" else v_target(x0, eps, alpha, sigma)
    x_j = ddim_step(x_i, pred, acp[700].item(), acp[300].item(), prediction_type)
    torch.testing.assert_close(x_j, q_sample(schedule, x0, eps, j), rtol=0, atol=1e-12)


def test_ddim_stochastic_is_seeded() -> None:
    schedule = make_ddpm_schedule("cosine", 100, zero_terminal_snr=True)
    noise = torch.randn(2, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model = ddpm_oracle(schedule, "v")

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ddim_sample(model, schedule, noise.double(), 10, prediction_type="v", eta=1.0, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_eps_prediction_refuses_zero_terminal_snr() -> None:
    schedule = make_ddpm_schedule("cosine", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ddim_sample(ddpm_oracle(schedule, "eps"), schedule, gaussian_noise()[:2], 5, prediction_type="eps")


# --- SDEdit -------------------------------------------------------------------------------------


def _init_and_noise() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    init, noise = torch.randn(2, 2, 4, 3, 4, 4, generator=gen).unbind(0)
    return init, noise


@pytest.mark.parametrize("sampler", [euler_sample, heun_sample])
def test_sdedit_flow(sampler) -> None:
    init, noise = _init_and_noise()
    model = Recorder(lambda x, t: -x)
    assert sampler(model, noise, 5, shift=3.0, init=init, strength=0.0) is init
    assert not model.calls

    sampler(model, noise, 5, shift=3.0, init=init, strength=1.0)
    x_first, t_first = model.calls[0]
    assert torch.equal(x_first, noise) and torch.all(t_first == 1.0)

    model.calls.clear()
    sampler(model, noise, 5, shift=3.0, init=init, strength=0.5)
    x_first, t_first = model.calls[0]
    t0 = shift_timesteps(0.5, 3.0)  # 0.75
    assert t0 == pytest.approx(0.75) and torch.allclose(t_first, torch.full((2,), t0))
    torch.testing.assert_close(x_first, 0.25 * init + 0.75 * noise)
    start, t_start = sdedit_flow_start(init, noise, 0.5, shift=3.0)
    torch.testing.assert_close(start, flow_interpolate(init, noise, torch.full((2,), t_start)))
    assert len(model.calls) == (5 if sampler is euler_sample else 9)
    assert model.times[-1] > 0


def test_sdedit_ddpm() -> None:
    init, noise = _init_and_noise()
    schedule = make_ddpm_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    model = Recorder(lambda x, t: torch.zeros_like(x))
    assert ddim_sample(model, schedule, noise, 10, init=init, strength=0.0) is init
    assert not model.calls

    ddim_sample(model, schedule, noise, 10, init=init, strength=1.0)
    x_first, t_first = model.calls[0]
    assert torch.equal(x_first, noise) and torch.all(t_first == 1.0)

    model.calls.clear()
    ddim_sample(model, schedule, noise, 10, init=init, strength=0.5)
    x_first, t_first = model.calls[0]
    assert torch.allclose(t_first, torch.full((2,), 0.5))  # index 499
    torch.testing.assert_close(x_first, q_sample(schedule, init, noise, torch.full((2,), 499)))
    start, steps = sdedit_ddpm_start(schedule, init, noise, 0.5, 10)
    assert steps.tolist() == list(range(499, 0, -50)) and torch.equal(start, x_first)


def test_strength_below_one_needs_init() -> None:
    _, noise = _init_and_noise()
    with pytest.raises(ValueError, match="init"):
        euler_sample(lambda x, t: x, noise, 4, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        euler_sample(lambda x, t: x, noise, 4, init=noise, strength=1.5)


# --- dtypes and devices ----------------------------------------------------------------------------


def test_half_precision_latents_get_float32_times() -> None:
    _, noise = _init_and_noise()
    model = Recorder(lambda x, t: -x)
    out = heun_sample(model, noise.bfloat16(), 3, shift=2.0)
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for _, t in model.calls)
    schedule = make_ddpm_schedule("cosine", 100, zero_terminal_snr=True)
    model.calls.clear()
    gen = torch.Generator().manual_seed(0)
    out = ddim_sample(model, schedule, noise.bfloat16(), 3, eta=1.0, generator=gen)
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for _, t in model.calls)


@pytest.mark.gpu
def test_cuda_latents_with_cpu_generator_match_cpu() -> None:
    """Noise is drawn on the generator's device, so a CPU generator reproduces CPU results on CUDA."""
    schedule = make_ddpm_schedule("cosine", 100, zero_terminal_snr=True)
    _, noise = _init_and_noise()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * expand_like(t, x).to(x.dtype)

    def run(device: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = ddim_sample(model, schedule, noise.to(device), 5, eta=1.0, generator=gen)
        return euler_sample(model, x, 3, shift=2.0).cpu()

    torch.testing.assert_close(run("cuda"), run("cpu"), rtol=1e-4, atol=1e-5)
    steps = torch.tensor([0, 50])
    on_cuda = q_sample(schedule.to("cuda"), noise.cuda(), noise.cuda(), steps.cuda())
    torch.testing.assert_close(on_cuda.cpu(), q_sample(schedule, noise, noise, steps), rtol=1e-5, atol=1e-6)
    times = sample_flow_time(16, device="cuda", generator=torch.Generator().manual_seed(2))
    assert times.is_cuda
    torch.testing.assert_close(times.cpu(), sample_flow_time(16, generator=torch.Generator().manual_seed(2)))
