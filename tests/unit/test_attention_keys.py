"""The UNet attention observer scores the key words from the block's own attention call (the q and k
the block projected, LoRA included), leaves the attention's output untouched, falls back to the
block's to_q / to_k where another pack replaces attn2, and never reads a tensor back to the host."""

from __future__ import annotations

import math

import torch

from asyndm.comfy_adapter.attention import AttentionObserver
from benchmarks.bench.dispatch_count import count_run

HEADS, DIM, GRID, TOKENS = 2, 4, (2, 2), 5
KEY = ("input", 7, 0)
COLUMNS = {"c": [[1, 2], [4]]}


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.to_q = torch.nn.Linear(6, HEADS * DIM)
    m.to_k = torch.nn.Linear(16, HEADS * DIM)
    return m


def _options(rows: int) -> dict:
    """The extra_options ComfyUI gives attn2 patches: uncond then cond chunk, at the capture grid."""
    return {"activations_shape": (2 * rows, 6, *GRID), "block": ("input", 7), "block_index": 0,
            "cond_or_uncond": [1, 0], "uuids": ["u", "c"], "n_heads": HEADS, "dim_head": DIM}


def _want(module: torch.nn.Module, n: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """float64: softmax(q k^T / sqrt(d)) of the cond rows, averaged over heads and each item's columns."""
    q = module.to_q(n).double().view(n.shape[0], -1, HEADS, DIM).transpose(1, 2)
    k = module.to_k(context).double().view(context.shape[0], -1, HEADS, DIM).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), dim=-1).mean(dim=1)
    return torch.stack([probs[..., cols].mean(-1) for cols in COLUMNS["c"]], dim=-1)


def _block_call(obs: AttentionObserver, module: torch.nn.Module, n: torch.Tensor, context: torch.Tensor,
                options: dict, replaced: bool, check: bool = True) -> torch.Tensor:
    """What BasicTransformerBlock does: the attn2 patch, then (unless replaced) the attention call."""
    obs(n, context, context, options)
    if replaced:
        return torch.zeros(())

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **_: object) -> torch.Tensor:
        return q * 2.0

    q, k = module.to_q(n), module.to_k(context)
    out = options["transformer_options"]["optimized_attention_override"](attention, q, k, k, HEADS,
                                                                         transformer_options={})
    assert not check or torch.equal(out, q * 2.0)  # the attention itself is unchanged
    return out


def _observer(replaced: bool) -> tuple[AttentionObserver, dict]:
    obs = AttentionObserver({KEY: _module()}, GRID, (8, 8), 1, COLUMNS)
    model_options: dict = {"transformer_options": {"patches_replace": {"attn2": {KEY: object()}} if replaced else {}}}
    obs.install(model_options)
    obs.enabled = True
    return obs, model_options


def test_scores_come_from_the_blocks_own_attention_call_or_its_projections() -> None:
    for replaced in (False, True):
        obs, model_options = _observer(replaced)
        module = obs.modules[KEY]
        n = torch.randn(2, 4, 6)  # (uncond + cond rows, h*w, width)
        context = torch.randn(2, TOKENS, 16)
        options = {**_options(1), "transformer_options": model_options["transformer_options"]}
        with torch.no_grad():
            _block_call(obs, module, n, context, options, replaced)
            got = obs.mean()
            want = _want(module, n[1:], context[1:])
        assert got is not None and got.shape == (1, 4, 2)
        assert torch.allclose(got.double(), want, atol=1e-6), replaced


def test_in_place_weight_changes_are_seen_at_the_next_call() -> None:
    obs, model_options = _observer(False)
    module = obs.modules[KEY]
    n, context = torch.randn(2, 4, 6), torch.randn(2, TOKENS, 16)
    options = {**_options(1), "transformer_options": model_options["transformer_options"]}
    with torch.inference_mode():  # as ComfyUI samples: no version counters to lean on
        _block_call(obs, module, n, context, options, False)
        first = obs.mean()
        module.to_k.weight.mul_(2.0)  # a LoRA hook keyframe patching weights in place between steps
        obs.reset()
        _block_call(obs, module, n, context, options, False)
        second = obs.mean()
        want = _want(module, n[1:], context[1:])
    assert first is not None and second is not None and not torch.equal(first, second)
    assert torch.allclose(second.double(), want, atol=1e-6)


def test_scoring_reads_nothing_back() -> None:
    obs, model_options = _observer(False)
    module = obs.modules[KEY]
    n, context = torch.randn(2, 4, 6), torch.randn(2, TOKENS, 16)
    options = {**_options(1), "transformer_options": model_options["transformer_options"]}
    with torch.inference_mode():
        count, _ = count_run(lambda: [_block_call(obs, module, n, context, options, False, False) for _ in range(3)]
                             + [obs.mean()])
    assert count.syncs == 0, dict(count.sync_sites)
    assert obs.count == 3


def test_half_precision_blocks_are_scored_in_float32_with_the_same_ops() -> None:
    """A float16 or bfloat16 block's q and k are scored in float32 (the float64 reference of the same half values),
    and converting them costs no op beyond a float32 block's: the head-major copy is the conversion."""
    ops = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        obs, model_options = _observer(False)
        module = obs.modules[KEY].to(dtype)
        n, context = torch.randn(2, 4, 6, dtype=dtype), torch.randn(2, TOKENS, 16, dtype=dtype)
        options = {**_options(1), "transformer_options": model_options["transformer_options"]}
        with torch.no_grad():  # (inference mode would hide the copies inside composite ops from the counter)
            _block_call(obs, module, n, context, options, False, False)
            _block_call(obs, module, n, context, options, False, False)  # two layers' worth: scored together
            count, got = count_run(obs.mean)
            want = _want(module, n[1:], context[1:])
        assert got is not None and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-6), dtype
        ops[dtype] = count.ops
    assert ops[torch.float16] == ops[torch.float32] == ops[torch.bfloat16], ops


def test_each_model_calls_chunks_are_read_from_its_own_lists() -> None:
    """The conditional chunks are worked out once per model call (its cond_or_uncond and uuids lists, shared by the
    call's layers) and kept for its other layers; the next call, with lists of its own, is read afresh: a call whose
    cond chunk comes first scores its own rows, and one with no cond chunk scores nothing."""
    obs, model_options = _observer(False)
    module = obs.modules[KEY]
    n, context = torch.randn(2, 4, 6), torch.randn(2, TOKENS, 16)
    to = model_options["transformer_options"]
    with torch.no_grad():
        for order in (["u", "c"], ["c", "u"], ["u", "c"]):  # uncond first, cond first, uncond first again
            obs.reset()
            cond_first = order == ["c", "u"]
            options = {**_options(1), "cond_or_uncond": [0, 1] if cond_first else [1, 0], "uuids": list(order),
                       "transformer_options": to}
            for _layer in range(2):  # two observed layers of one call: the second reuses the call's chunks
                _block_call(obs, module, n, context, options, False)
            got = obs.mean()
            rows = slice(0, 1) if cond_first else slice(1, 2)
            want = _want(module, n[rows], context[rows])
            assert got is not None and obs.count == 2
            assert torch.allclose(got.double(), want, atol=1e-6), order
        obs.reset()
        options = {**_options(1), "cond_or_uncond": [1, 1], "uuids": ["u", "u"], "transformer_options": to}
        _block_call(obs, module, n, context, options, False)  # no conditional chunk: nothing scored
        assert obs.mean() is None
