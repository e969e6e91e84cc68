"""ComfyUI's sub-quadratic attention (its CPU default) with the probabilities kept, on the observed layers
(asyndm/comfy_adapter/sub_quad.py): the restatement is attention_sub_quad bit for bit, its probabilities are the
softmax (float64 reference), calls it cannot restate are left to the function, and a dynamic-mask run that takes
the probabilities from the layers' own attention gives the latent of one that scores them from q and k."""

from __future__ import annotations

import importlib

import comfy.ldm.modules.attention as comfy_attention
import pytest
import torch

from asyndm.comfy_adapter import sub_quad
from tests.inprocess.conftest import PACK_MODULE

SUB_QUAD = getattr(comfy_attention.attention_sub_quad, "__wrapped__", comfy_attention.attention_sub_quad)


def _qkv(b: int, q_tokens: int, k_tokens: int, width: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, width, generator=g).to(dtype) for n in (q_tokens, k_tokens, k_tokens))


@pytest.mark.parametrize(("dtype", "precision"), [(torch.float32, None), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32)])
@pytest.mark.parametrize(("b", "q_tokens", "k_tokens", "heads", "width"), [(2, 64, 77, 8, 512), (1, 16, 77, 5, 320),
                                                                         (4, 9, 3, 2, 8)])
def test_the_restatement_is_sub_quad_bit_for_bit(dtype, precision, b, q_tokens, k_tokens, heads, width):
    q, k, v = _qkv(b, q_tokens, k_tokens, width, dtype)
    upcast = sub_quad.float32_scores(dtype, precision)
    assert upcast is (dtype != torch.float32)
    got = sub_quad.attention_with_probs(q, k, v, heads, upcast)
    assert got is not None
    out, probs = got
    want = SUB_QUAD(q, k, v, heads, attn_precision=precision)
    assert out.dtype == want.dtype and torch.equal(out, want)
    d = width // heads
    qh = q.double().view(b, q_tokens, heads, d).transpose(1, 2)
    kh = k.double().view(b, k_tokens, heads, d).transpose(1, 2)
    reference = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1).reshape(b * heads, q_tokens, k_tokens)
    assert probs.dtype == torch.float32 and torch.allclose(probs.double(), reference, atol=1e-6)


def test_the_check_accepts_sub_quad_and_refuses_another_function():
    assert sub_quad.is_sub_quad(SUB_QUAD) and sub_quad.is_sub_quad(comfy_attention.attention_sub_quad)
    assert not sub_quad.is_sub_quad(comfy_attention.attention_basic)

    def recording(q, k, v, heads, **kwargs):  # another pack's function in sub_quad's place: never bypassed
        return SUB_QUAD(q, k, v, heads, **kwargs)

    original = comfy_attention.attention_sub_quad
    try:
        comfy_attention.attention_sub_quad = recording
        assert not sub_quad.is_sub_quad(recording)
    finally:
        comfy_attention.attention_sub_quad = original
    assert sub_quad.is_sub_quad(SUB_QUAD)
    assert sub_quad.agrees(SUB_QUAD, False) and sub_quad.agrees(SUB_QUAD, True)

    def changed(q, k, v, heads, **kwargs):  # a release whose sub_quad computes something else
        return SUB_QUAD(q, k, v, heads, **kwargs) * 1.01

    assert not sub_quad.agrees(changed, False) and not sub_quad.agrees(changed, True)


def test_calls_it_cannot_restate_are_left_to_the_function():
    q, k, v = _qkv(2, 4, 3, 8, torch.float32)
    assert sub_quad.plain_call((q, k, v, 2), {"attn_precision": None, "transformer_options": {}}) is not None
    for kwargs in ({"mask": torch.zeros(4, 3)}, {"scale": 0.5}, {"skip_reshape": True}, {"skip_output_reshape": True},
                   {"enable_gqa": True}):
        assert sub_quad.plain_call((q, k, v, 2), kwargs) is None, kwargs
    assert sub_quad.plain_call((q[:, None], k[:, None], v[:, None], 2), {}) is None  # 4-D (skip_reshape layouts)
    assert sub_quad.plain_call((q, k, v, 3), {}) is None  # heads that do not divide the width
    # half-precision scores without upcasting are not the observer's float32: scored from q and k instead
    assert sub_quad.float32_scores(torch.float16, None) is None
    assert sub_quad.float32_scores(torch.float16, torch.float32) is True
    assert sub_quad.float32_scores(torch.float32, None) is False


def test_dynamic_masks_from_the_layers_own_attention_give_the_same_latent(pack_nodes, sd15_checkpoint, conds,
                                                                          monkeypatch):
    observer_module = importlib.import_module(f"{PACK_MODULE}.asyndm.comfy_adapter.attention")
    observer = observer_module.AttentionObserver
    model = sd15_checkpoint[0]
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def run() -> torch.Tensor:
        return pack_nodes.AsynDMKSampler.execute(model, pos, neg, latent, 1, 5, 5.0, "euler", "normal", 1.0,
                                                 "rabbit, basketball", 0.7, "bin", 1.0, "dynamic", 0.0, False,
                                                 None).args[0]["samples"]

    taken = []
    own = observer._own_sub_quad

    def spy(self, *args):
        out = own(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(observer, "_own_sub_quad", spy)
    with_probs = run()
    assert taken and all(taken), f"the layers' own attention was used in {sum(taken)} of {len(taken)} observed calls"

    install = observer.install

    def scores_from_q_and_k(self, model_options):
        install(self, model_options)
        self._sub_quad = None

    monkeypatch.setattr(observer, "install", scores_from_q_and_k)
    taken.clear()
    recomputed = run()
    assert not taken
    assert torch.equal(with_probs, recomputed)
