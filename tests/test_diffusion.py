"""Diffusion maths against hand-computed values: schedules, parametrisations, time sampling, losses, CFG."""

from __future__ import annotations

import math

import pytest
import torch

from vdm.diffusion import (
    DDPMSchedule,
    alpha_sigma,
    cosine_betas,
    ddim_timesteps,
    ddpm_loss,
    ddpm_loss_weight,
    ddpm_target,
    ddpm_time,
    ddpm_timesteps_from_time,
    expand_like,
    flow_interpolate,
    flow_loss,
    flow_loss_weight,
    flow_snr,
    flow_target,
    flow_timesteps,
    flow_velocity_to_noise,
    flow_velocity_to_x0,
    guided_denoiser,
    linear_betas,
    make_ddpm_schedule,
    min_snr_weight,
    prediction_to_x0_eps,
    q_sample,
    rescale_zero_terminal_snr,
    sample_ddpm_timesteps,
    sample_flow_time,
    scaled_linear_betas,
    shift_for_num_tokens,
    shift_timesteps,
    snr,
    weighted_mse,
)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- DDPM schedules ------------------------------------------------------------------------------


def test_linear_betas_hand_values() -> None:
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-12)
    scaled = scaled_linear_betas(1000)
    root = math.sqrt(0.00085) + 250 * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999
    assert scaled[250].item() == pytest.approx(root**2, rel=1e-12)
    assert scaled[-1].item() == pytest.approx(0.012, rel=1e-12)


def test_cosine_betas_hand_values() -> None:
    n, s = 1000, 0.008

    def f(i: int) -> float:
        return math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(n)
    for i in (0, 1, 400, 900):
        assert betas[i].item() == pytest.approx(1 - f(i + 1) / f(i), rel=1e-10)
    assert betas[-1].item() == 0.999  # clipped: f(N) = cos(pi/2)^2 ~ 0
    acp = make_ddpm_schedule("cosine", n).alphas_cumprod
    assert acp[499].item() == pytest.approx(f(500) / f(0), rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind: str) -> None:
    plain = make_ddpm_schedule(kind, 1000)
    zero = make_ddpm_schedule(kind, 1000, zero_terminal_snr=True)
    assert zero.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.0
    first = torch.zeros(1, dtype=torch.long)
    assert snr(zero, first).item() == pytest.approx(snr(plain, first).item(), rel=1e-9)
    assert torch.all(zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1])
    # Lin et al.: sqrt(acp) is an affine map of the original one
    sqrt_plain, sqrt_zero = plain.alphas_cumprod.sqrt(), zero.alphas_cumprod.sqrt()
    scale = sqrt_plain[0] / (sqrt_plain[0] - sqrt_plain[-1])
    torch.testing.assert_close(sqrt_zero, (sqrt_plain - sqrt_plain[-1]) * scale, rtol=0, atol=1e-12)
    betas = rescale_zero_terminal_snr(linear_betas(10))
    assert betas[-1].item() == 1.0 and torch.all(betas[:-1] < 1)


def test_schedule_is_frozen_float64() -> None:
    schedule = DDPMSchedule(alphas_cumprod=torch.linspace(0.99, 0.01, 5, dtype=torch.float32))
    assert schedule.alphas_cumprod.dtype == torch.float64 and schedule.num_train_steps == 5
    with pytest.raises(AttributeError):
        schedule.alphas_cumprod = torch.ones(3)  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_q_sample_and_conversions_round_trip(dtype: torch.dtype, prediction_type: str) -> None:
    schedule = make_ddpm_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    x0, noise = randn(2, 4, 4, 3, 8, 8, dtype=dtype).unbind(0)
    steps = torch.tensor([0, 10, 500, 998])
    x_t = q_sample(schedule, x0, noise, steps)
    assert x_t.dtype == dtype
    alpha, sigma = alpha_sigma(schedule, steps)
    expected = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
    torch.testing.assert_close(x_t, expected, check_dtype=False)
    target = ddpm_target(schedule, x0, noise, steps, prediction_type)
    x0_hat, eps_hat = prediction_to_x0_eps(schedule, x_t, target, steps, prediction_type)
    # eps -> x0 divides by alpha (4e-4 at index 998), so its rounding error is allowed to grow by 1 / alpha
    conditioning = expand_like(alpha, x0) if prediction_type == "eps" else 1.0
    tiny = 8 * torch.finfo(dtype).eps
    assert ((x0_hat - x0).abs() * conditioning).max() < tiny
    assert (eps_hat - noise).abs().max() < tiny


def test_v_prediction_recovers_x0_at_zero_snr() -> None:
    schedule = make_ddpm_schedule("cosine", 100, zero_terminal_snr=True)
    x0, noise = randn(2, 3, 4, 2, 2, 2).unbind(0)
    last = torch.full((3,), 99)
    x_t = q_sample(schedule, x0, noise, last)
    torch.testing.assert_close(x_t, noise, rtol=0, atol=0)
    v = ddpm_target(schedule, x0, noise, last, "v")
    torch.testing.assert_close(v, -x0, rtol=0, atol=0)  # alpha = 0, sigma = 1
    x0_hat, eps_hat = prediction_to_x0_eps(schedule, x_t, v, last, "v")
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-12)


def test_ddpm_time_mapping() -> None:
    steps = torch.arange(1000)
    t = ddpm_time(steps, 1000)
    assert t.dtype == torch.float32 and t[0].item() == pytest.approx(0.001) and t[-1].item() == 1.0
    assert torch.equal(ddpm_timesteps_from_time(t, 1000), steps)
    drawn = sample_ddpm_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.long and drawn.min() >= 0 and drawn.max() <= 999
    assert torch.equal(drawn, sample_ddpm_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0)))


def test_ddim_timesteps_spacings() -> None:
    assert ddim_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert ddim_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert ddim_timesteps(1000, 10, "trailing", strength=0.5).tolist() == list(range(499, 0, -50))
    assert ddim_timesteps(1000, 10, strength=0.0).numel() == 0
    assert ddim_timesteps(10, 50).tolist() == list(range(9, -1, -1))  # clamped to the available steps


# --- flow ------------------------------------------------------------------------------------------


def test_flow_interpolation_and_conversions() -> None:
    x0, noise = randn(2, 3, 4, 2, 4, 4).unbind(0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = flow_interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(x_t[2], noise[2], rtol=0, atol=0)
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * noise[1])
    v = flow_target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    torch.testing.assert_close(flow_velocity_to_x0(x_t, v, t), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow_velocity_to_noise(x_t, v, t), noise, rtol=0, atol=1e-12)
    # dx_t/dt is the velocity
    eps = 1e-6
    dt = (flow_interpolate(x0, noise, t + eps) - flow_interpolate(x0, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(dt, v, rtol=0, atol=1e-7)


def test_timestep_shift() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    assert shift_timesteps(0.5, 3.0) == pytest.approx(0.75)
    assert shift_timesteps(0.25, 2.0) == pytest.approx(0.4)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > t[1:-1])
    # multiplies the noise-to-signal ratio by the shift
    inner = t[1:-1]
    torch.testing.assert_close(shifted[1:-1] / (1 - shifted[1:-1]), 3.0 * inner / (1 - inner))
    assert shift_for_num_tokens(1024, base_num_tokens=256) == pytest.approx(2.0)
    assert shift_for_num_tokens(256 * 9, base_num_tokens=256, base_shift=1.5) == pytest.approx(4.5)


def test_flow_sampling_schedule() -> None:
    times = flow_timesteps(8, shift=3.0)
    assert times.shape == (9,) and times[0].item() == 1.0 and times[-1].item() == 0.0
    assert torch.all(times[1:] < times[:-1])
    torch.testing.assert_close(times, shift_timesteps(torch.linspace(1, 0, 9), 3.0))
    partial = flow_timesteps(4, shift=3.0, strength=0.5, dtype=torch.float64)
    assert partial[0].item() == pytest.approx(0.75) and partial[-1].item() == 0.0


def test_logit_normal_time_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    t = sample_flow_time(100_000, "logit_normal", mean=0.5, std=1.2, generator=gen)
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert torch.all((t > 0) & (t < 1))
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(1.2, abs=0.02)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(t, sample_flow_time(100_000, "logit_normal", mean=0.5, std=1.2, generator=gen))
    shifted = sample_flow_time(100, shift=3.0, generator=torch.Generator().manual_seed(1))
    plain = sample_flow_time(100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, shift_timesteps(plain, 3.0))


def test_uniform_time_statistics() -> None:
    t = sample_flow_time(100_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert torch.all((t >= 0) & (t < 1))
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.002)
    with pytest.raises(ValueError, match="unknown"):
        sample_flow_time(4, "beta")  # type: ignore[arg-type]


# --- losses --------------------------------------------------------------------------------------


def test_weighted_mse_per_sample() -> None:
    pred, target = randn(2, 3, 4, 2, 4, 4).unbind(0)
    loss = weighted_mse(pred, target)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, ((pred - target) ** 2).flatten(1).mean(1))
    weight = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    torch.testing.assert_close(weighted_mse(pred, target, weight), loss * weight)
    half = weighted_mse(pred.bfloat16(), target.bfloat16())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        weighted_mse(pred, target[:, :2])


def test_min_snr_weights_hand_values() -> None:
    snr_values = torch.tensor([0.0, 0.5, 5.0, 20.0], dtype=torch.float64)
    eps = min_snr_weight(snr_values, 5.0, "eps")
    v = min_snr_weight(snr_values, 5.0, "v")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21], dtype=torch.float64))
    schedule = make_ddpm_schedule("cosine", 1000, zero_terminal_snr=True)
    steps = torch.tensor([0, 100, 600, 999])
    weights = ddpm_loss_weight(schedule, steps, "v", "min_snr", gamma=5.0)
    torch.testing.assert_close(weights, min_snr_weight(snr(schedule, steps), 5.0, "v").float())
    assert weights[-1].item() == 0.0  # SNR 0: v carries no x0 information to weight
    assert torch.equal(ddpm_loss_weight(schedule, steps, "eps"), torch.ones(4))


def test_flow_weights_hand_values() -> None:
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.05, 0.25, 0.01, 0.0], dtype=torch.float64)  # min((1-t)^2, 5 t^2)
    torch.testing.assert_close(flow_loss_weight(t, "min_snr", gamma=5.0), expected)
    cosmap = flow_loss_weight(t, "cosmap")
    assert cosmap[2].item() == pytest.approx(4 / math.pi) and cosmap[0].item() == pytest.approx(2 / math.pi)
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    assert torch.trapezoid(flow_loss_weight(grid, "cosmap"), grid).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.equal(flow_loss_weight(t), torch.ones_like(t))


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_equals_clipped_x0_loss_ddpm(prediction_type: str) -> None:
    """Hang et al.: the weighted eps / v loss is the x0 loss weighted by min(SNR, gamma)."""
    schedule = make_ddpm_schedule("scaled_linear", 1000)
    x0, noise, pred = randn(3, 4, 2, 2, 4, 4).unbind(0)
    steps = torch.tensor([3, 200, 600, 999])
    x_t = q_sample(schedule, x0, noise, steps)
    loss = ddpm_loss(pred, schedule, x0, noise, steps, prediction_type, "min_snr", gamma=5.0)
    x0_hat, _ = prediction_to_x0_eps(schedule, x_t, pred, steps, prediction_type)
    x0_loss = weighted_mse(x0_hat, x0, snr(schedule, steps).clamp(max=5.0))
    torch.testing.assert_close(loss, x0_loss, rtol=1e-5, atol=0)


def test_min_snr_equals_clipped_x0_loss_flow() -> None:
    x0, noise, pred = randn(3, 4, 2, 2, 4, 4).unbind(0)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    x_t = flow_interpolate(x0, noise, t)
    loss = flow_loss(pred, x0, noise, t, "min_snr", gamma=5.0)
    x0_loss = weighted_mse(flow_velocity_to_x0(x_t, pred, t), x0, flow_snr(t).clamp(max=5.0))
    torch.testing.assert_close(loss, x0_loss)
    torch.testing.assert_close(flow_loss(pred, x0, noise, t), weighted_mse(pred, noise - x0))


# --- classifier-free guidance --------------------------------------------------------------------


class CountingModel:
    """A conditional toy model that records the batch size of each call."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert pooled is None
        self.batch_sizes.append(x.shape[0])
        return x * expand_like(1 + t, x) + expand_like(text.sum(dim=(1, 2)), x)


def _cfg_inputs() -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    x = randn(3, 4, 2, 4, 4, seed=1)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    cond = {"text": randn(3, 5, 8, seed=2), "pooled": None}
    uncond = {"text": torch.zeros(3, 5, 8, dtype=torch.float64), "pooled": None}
    return x, t, cond, uncond


def test_cfg_scale_one_is_the_conditional_model() -> None:
    x, t, cond, uncond = _cfg_inputs()
    model = CountingModel()
    out = guided_denoiser(model, cond, uncond, 1.0)(x, t)
    assert model.batch_sizes == [3]
    assert torch.equal(out, CountingModel()(x, t, **cond))


@pytest.mark.parametrize("scale", [0.0, 4.5])
def test_cfg_formula_in_one_batched_call(scale: float) -> None:
    x, t, cond, uncond = _cfg_inputs()
    model = CountingModel()
    out = guided_denoiser(model, cond, uncond, scale)(x, t)
    assert model.batch_sizes == [6]
    c, u = CountingModel()(x, t, **cond), CountingModel()(x, t, **uncond)
    torch.testing.assert_close(out, u + scale * (c - u), rtol=0, atol=1e-12)


def test_cfg_rejects_mismatched_conditioning() -> None:
    x, t, cond, uncond = _cfg_inputs()
    with pytest.raises(ValueError, match="same keys"):
        guided_denoiser(CountingModel(), cond, {"text": uncond["text"]}, 3.0)
    with pytest.raises(TypeError, match="pooled"):
        guided_denoiser(CountingModel(), cond, {**uncond, "pooled": torch.zeros(3, 8)}, 3.0)
    with pytest.raises(ValueError, match="pad"):
        guided_denoiser(CountingModel(), cond, {**uncond, "text": torch.zeros(3, 4, 8)}, 3.0)
    with pytest.raises(ValueError, match="batch"):
        guided_denoiser(CountingModel(), cond, uncond, 3.0)(x[:2], t[:2])
