"""The attention observer computes the text keys once per run and recomputes them when they change."""

from __future__ import annotations

import torch

from asyndm.comfy_adapter.attention import AttentionObserver


class CountingLinear(torch.nn.Linear):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.to_k = CountingLinear(16, 8)
    return m


def _keys(obs: AttentionObserver, module: torch.nn.Module, context: torch.Tensor, uuid: str = "c") -> torch.Tensor:
    return obs._text_keys(module, (("input", 7), 0), uuid, context, heads=2, dim_head=4)


def test_keys_are_reused_while_context_and_weights_are_unchanged() -> None:
    module = _module()
    obs = AttentionObserver({}, (2, 2), (8, 8), 1, {})
    context = torch.randn(1, 5, 16)
    first = _keys(obs, module, context)
    want = module.to_k(context).view(1, 5, 2, 4).transpose(1, 2)
    module.to_k.calls = 0
    for _ in range(3):  # later steps: a new tensor with the same text
        assert torch.equal(_keys(obs, module, context.clone()), first)
    assert module.to_k.calls == 0
    assert torch.equal(first, want)


def test_changed_context_or_weights_recompute() -> None:
    module = _module()
    obs = AttentionObserver({}, (2, 2), (8, 8), 1, {})
    context = torch.randn(1, 5, 16)
    first = _keys(obs, module, context)
    other = _keys(obs, module, context + 1.0)  # another cond under the same uuid
    assert not torch.equal(first, other)
    with torch.no_grad():
        module.to_k.weight.mul_(2.0)  # a LoRA hook keyframe patching weights in place between steps
    patched = _keys(obs, module, context + 1.0)
    assert torch.allclose(patched, 2.0 * other - module.to_k.bias.view(1, 1, 2, 4).transpose(1, 2), atol=1e-6)
    module.to_k.weight = torch.nn.Parameter(module.to_k.weight.detach() * 0.5)  # weights replaced
    assert torch.allclose(_keys(obs, module, context + 1.0), other, atol=1e-6)
    module.to_k.weight_function = [lambda w, *a: w]  # weights computed at cast time: never cached
    calls = module.to_k.calls
    _keys(obs, module, context + 1.0)
    _keys(obs, module, context + 1.0)
    assert module.to_k.calls == calls + 2


def test_inference_mode_weights_are_cached_and_checked() -> None:
    """ComfyUI samples under torch.inference_mode: its tensors have no version counter to read."""
    with torch.inference_mode():
        module = _module()
        obs = AttentionObserver({}, (2, 2), (8, 8), 1, {})
        context = torch.randn(1, 5, 16)
        first = _keys(obs, module, context)
        module.to_k.calls = 0
        assert torch.equal(_keys(obs, module, context.clone()), first)
        assert module.to_k.calls == 0
        module.to_k.weight.add_(0.5)  # in place, inside inference mode
        changed = _keys(obs, module, context)
        assert module.to_k.calls == 1 and not torch.equal(changed, first)
        module.to_k.bias.add_(1.0)
        assert torch.allclose(_keys(obs, module, context), changed + 1.0, atol=1e-6)
