"""ASYNDM_SCHEDULE validation."""

from __future__ import annotations

import pytest
import torch

from asyndm.schedule_spec import AsynSchedule


def test_defaults_are_synchronous() -> None:
    assert AsynSchedule().is_synchronous
    assert AsynSchedule(k=(0.0,), words=("cat",)).is_synchronous
    assert not AsynSchedule(k=(0.7,), words=("cat",)).is_synchronous


@pytest.mark.parametrize("kwargs, match", [
    ({"curve": "cubic"}, "unknown curve"),
    ({"k": (1.2,), "words": ("a",)}, "must lie in"),
    ({"k": (0.5,), "words": ()}, "one k per word"),
    ({"threshold": 0.0}, "threshold"),
    ({"mask_source": "masks", "k": (0.5,)}, "needs masks"),
    ({"mask_source": "masks", "k": (0.5,), "masks": torch.full((1, 1, 4, 4), float("nan"))}, "NaN"),
    ({"mask_source": "masks", "k": (0.5, 0.5), "masks": torch.ones(1, 1, 4, 4)}, "one k per mask"),
    ({"mask_source": "paint"}, "unknown mask source"),
])
def test_bad_schedules(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AsynSchedule(**kwargs)


def test_is_frozen() -> None:
    s = AsynSchedule(k=(0.7,), words=("cat",))
    with pytest.raises(AttributeError):
        s.curve = "lin"  # type: ignore[misc]
