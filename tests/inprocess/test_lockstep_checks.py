"""The lock-step run's join checks, deferred to the end of the run (no host read per step): a
re-partition that reaches a sigma the sampler already used is refused by name; one that changes only
sigmas still ahead continues, and gives what a run on the new tracks from the start gives."""

from __future__ import annotations

import comfy.samplers
import pytest
import torch

from asyndm.comfy_adapter.lockstep import LockstepError, run_lockstep
from asyndm.comfy_adapter.track_model import TrackSet
from benchmarks.bench.dispatch_count import count_run

N = 6


def tracks(second: list[float]) -> TrackSet:
    carrier = torch.linspace(10.0, 0.0, N + 1)
    sigmas = torch.stack([carrier, torch.tensor(second)])
    index = torch.zeros(1, 4, 4, dtype=torch.long)
    index[..., :2, :] = 1
    return TrackSet(sigmas, index, None, sigmas.clone(), index.clone())


def model(x, sigma_map, carrier, options=None, seed=None, table=None):
    """A denoiser that depends on each pixel's sigma (so a changed sigma changes the path)."""
    sig = carrier.view(-1, 1, 1, 1) if sigma_map is None else sigma_map
    return x / (1.0 + sig)


def run(first: TrackSet, later: TrackSet | None = None, at: int = 2) -> torch.Tensor:
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def start(tr: TrackSet) -> torch.Tensor:
        return noise * tr.sigma_map(0)

    class Retrack:
        """Re-partitions once, at the rendezvous that begins step `at` (after its call is queued)."""

        def begin(self, begun: int) -> int | None:
            return begun if begun == at else None

        def finish(self, reading: int, current: TrackSet) -> TrackSet | None:
            return later if current is first else None

    out, _ = run_lockstep(comfy.samplers.ksampler("euler"), object(), first, {"model_options": {}, "seed": 0}, None,
                          start, True, model, Retrack() if later is not None else None)
    return out


KEY = [10.0, 9.5, 8.0, 6.0, 4.0, 1.0, 0.0]


def test_a_change_of_sigmas_still_ahead_continues_as_if_planned_from_the_start():
    ahead = [10.0, 9.5, 8.0, 5.0, 3.0, 1.5, 0.0]  # differs from column 3 on: not used before step 2's call
    got = run(tracks(KEY), tracks(ahead), at=2)
    assert torch.equal(got, run(tracks(ahead)))


def test_a_change_of_a_used_sigma_is_refused_after_the_run_without_reading_the_host_per_step():
    used = [10.0, 9.0, 8.0, 6.0, 4.0, 1.0, 0.0]  # column 1 changed after step 1 already used it
    with pytest.raises(LockstepError, match="changes a sigma the sampler has already used"):
        run(tracks(KEY), tracks(used), at=2)
    count, _ = count_run(lambda: run(tracks(KEY), tracks([10.0, 9.5, 8.0, 5.0, 3.0, 1.5, 0.0]), at=2))
    assert count.pack_syncs() == 1, dict(count.sync_sites)  # the one read of the deferred checks, after the loop
