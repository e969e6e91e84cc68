"""Dynamic masks keep each priority history's AsynDM states across re-partitions (sampler._StateRowCache):
a row's states depend on that row alone, so the cached rows are exactly what the recurrence gives for
the whole table at once, whatever rows come with it."""

from __future__ import annotations

import pytest
import torch

from asyndm.comfy_adapter.sampler import AsynSampler, _StateRowCache
from asyndm.schedule_spec import AsynSchedule


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_cached_state_rows_are_the_recurrence_bit_for_bit(curve):
    sampler = AsynSampler("euler", AsynSchedule(curve=curve, k=(0.7, 0.4), mask_source="attention", words=("cat", "hat")))
    cache = _StateRowCache(sampler._state_rows)
    generator = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.0, 0.4, 0.7])
    history = levels[torch.randint(0, 3, (6, 12), generator=generator)]
    history[0] = 0.0  # a background row, as track 0 always is
    for _ in range(5):  # re-partitions: some rows kept, some changed from a step on, rows reordered
        changed = torch.randint(0, 6, (2,), generator=generator)
        start = int(torch.randint(1, 12, (), generator=generator))
        history[changed, start:] = levels[torch.randint(0, 3, (2, 1), generator=generator)]
        history = history[torch.randperm(6, generator=generator)]
        assert torch.equal(cache(history), sampler._state_rows(history))
    assert 6 < len(cache.rows) <= 6 + 5 * 2
