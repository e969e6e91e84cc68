"""asyndm.sigma_map: the background track maps onto the scheduler's sigmas exactly."""

from __future__ import annotations

import math

import pytest
import torch

from asyndm.sigma_map import TimestepTable, background_track, state_to_sigma, track_on_table


def karras(n: int, lo: float = 0.03, hi: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@pytest.mark.parametrize("n", [1, 2, 7, 20, 30, 50])
def test_background_track_is_the_linear_schedule(n: int) -> None:
    track = background_track(n).double()
    expected = torch.tensor([1001 - 1000 * (i + 1) / n for i in range(n)], dtype=torch.float64)
    assert torch.allclose(track, expected, atol=1e-3)
    assert track[-1].item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("num_train_timesteps", "offset"), [(1000, 1), (999, 0), (4096, 3)])
def test_background_track_is_the_samplers_recurrence_bit_for_bit(dtype, num_train_timesteps, offset) -> None:
    """The track is the recurrence s <- s + (offset - s) / remaining on torch scalars of the dtype (as the
    sampler's states take it), computed without a torch op per step."""
    for n in (1, 2, 9, 10, 33, 50, 200):
        s, want = torch.tensor(float(num_train_timesteps + offset), dtype=dtype), []
        for i in range(n):
            s = s + (float(offset) - s) / (n - i)
            want.append(s)
        got = background_track(n, num_train_timesteps=num_train_timesteps, offset=offset, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, torch.stack(want)), n


def test_paper_timesteps_for_50_steps() -> None:
    assert background_track(50)[:3].tolist() == [981.0, 961.0, 941.0]


@pytest.mark.parametrize("n", [5, 20, 33])
def test_background_states_get_the_scheduler_sigmas_bit_for_bit(n: int) -> None:
    sig = karras(n)
    track = background_track(n)
    out = state_to_sigma(track[:, None, None].expand(n, 3, 4).contiguous(), sig, sigma_top=14.6)
    assert torch.equal(out, sig[:-1, None, None].expand(n, 3, 4))


def test_states_between_anchors_interpolate_log_sigma() -> None:
    n = 10
    sig = karras(n)
    track = background_track(n)
    mid = (track[3] + track[4]) / 2
    got = state_to_sigma(mid.reshape(1), sig, sigma_top=14.6).item()
    want = math.exp((math.log(sig[3].item()) + math.log(sig[4].item())) / 2)
    assert got == pytest.approx(want, rel=1e-5)


def test_noisier_states_get_larger_sigmas_and_top_is_sigma_top() -> None:
    n = 12
    sig = karras(n, hi=10.0)
    s = torch.linspace(1001, 1, 200)
    out = state_to_sigma(s, sig, sigma_top=14.6)
    assert bool((out[:-1] >= out[1:]).all())
    assert out[0].item() == pytest.approx(14.6, rel=1e-6)
    assert state_to_sigma(torch.tensor([0.0]), sig, sigma_top=14.6).item() == 0.0


def test_bad_carrier_is_refused() -> None:
    with pytest.raises(ValueError, match="N \\+ 1"):
        state_to_sigma(torch.tensor([5.0]), torch.tensor([1.0]), sigma_top=1.0)
    with pytest.raises(ValueError, match="> 0"):
        state_to_sigma(torch.tensor([5.0]), torch.tensor([1.0, 0.0, 0.0]), sigma_top=1.0)


def sd_sigma_table() -> torch.Tensor:
    """The model's sigma per integer timestep (SD's scaled-linear schedule), float32 like ComfyUI's."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, dim=0)
    return ((1 - ac) / ac).sqrt().float()


def ddim_uniform(table: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's ddim_uniform for n steps dividing 1000: table at 1, 1 + 1000/n, ..., reversed, then 0."""
    picked = [float(table[t]) for t in range(1, 1000, 1000 // n)][::-1]
    return torch.tensor(picked + [0.0])


@pytest.mark.parametrize("n", [4, 10, 50])
def test_ddim_uniform_lies_on_the_table_and_other_schedules_do_not(n: int) -> None:
    table = sd_sigma_table()
    sigmas = ddim_uniform(table, n)
    assert track_on_table(sigmas, table)
    assert not track_on_table(torch.cat([sigmas[:-1] * 1.001, sigmas[-1:]]), table)
    assert not track_on_table(karras(n), table)


def test_timestep_table_gives_every_state_the_models_sigma_at_its_integer_timestep() -> None:
    table = sd_sigma_table()
    sigmas = ddim_uniform(table, 50)
    to_sigma = TimestepTable(table, final=sigmas[-1])
    track = background_track(50)
    assert torch.equal(to_sigma(track), sigmas[:-1])  # the background: the scheduler's sigmas, bit for bit
    states = torch.tensor([994.72, 988.0, 980.5, 1000.6, 0.4, 0.0])
    want = [table[995], table[988], table[980], table[999], table[0], 0.0]  # round half to even; clamp at 999
    assert to_sigma(states).tolist() == [float(v) for v in want]
    reference = TimestepTable(table, final=table[0])  # the paper's last step, t = 0
    assert float(reference(torch.tensor([0.0]))[0]) == float(table[0]) > 0


@pytest.mark.parametrize("seed", range(3))
def test_the_host_interpolation_is_the_device_one_bit_for_bit(seed: int) -> None:
    """The sampler's track tables take the numpy path (CPU states); the torch path serves device states: the
    same sigmas from both, at anchors, between them, below the last one, above the top and at 0."""
    from asyndm.sigma_map import SigmaInterpolator

    generator = torch.Generator().manual_seed(seed)
    n = 6 + 7 * seed
    sig = torch.cat([torch.sort(torch.rand(n, generator=generator) * 14 + 0.03, descending=True).values,
                     torch.zeros(1)])
    interp = SigmaInterpolator(sig, sigma_top=15.0)
    track = background_track(n)
    states = torch.cat([torch.rand(200, generator=generator) * 1001.0, track, torch.tensor([0.0, 1001.0, 1000.0,
                        0.5, float(track[-1]), 2000.0])]).view(1, -1)
    host, device = interp._on_host(states), interp._on_device(states)
    assert host.dtype == device.dtype == torch.float32 and host.shape == states.shape
    assert torch.equal(host, device)
    assert torch.equal(interp(states), device)
    # the host path skips an end where no state lies there: states strictly inside, and none at all
    inside = states[(states >= float(track[-1])) & (states < 1001.0)]
    assert 0 < inside.numel() < states.numel()
    assert torch.equal(interp._on_host(inside), interp._on_device(inside))
    assert interp._on_host(states[:, :0]).shape == (1, 0)
