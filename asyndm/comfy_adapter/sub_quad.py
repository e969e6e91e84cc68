"""ComfyUI's sub-quadratic attention (its default on the CPU) on an observed layer, with the probabilities kept.

For a short text context ``attention_sub_quad`` computes softmax(QK^T / sqrt(d)) whole (one query chunk, one key
chunk) and drops it once multiplied by V; the attention observer would then compute it a second time from the same
q and k. On the observed layers the observer runs those same operations itself (the same head-major copies, the
same batched products and softmax, in the same precision, on the same chunking decision from the same free-memory
reading) and keeps the probabilities. It does so only where that is ComfyUI's result bit for bit:
- the function is ComfyUI's own ``attention_sub_quad`` (by identity), called as q, k, v, heads with no mask, scale,
  reshape flag or other option;
- the scores are float32 (float32 inputs, or upcast attention), so the kept probabilities are what the observer's
  own scoring would compute;
- sub_quad would take its unchunked path (enough free memory for one chunk of all the keys and all the queries);
- ``agrees`` finds this restatement equal to the function itself, bit for bit, on a small problem (once per run and
  precision: a ComfyUI release that changes the function sends every layer back to the observer's own scoring).
Elsewhere (PyTorch's fused attention on GPUs, xformers, another pack's override) the observer scores the layer from
its q and k as before.
"""

from __future__ import annotations

import contextlib
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy import model_management

__all__ = ["attention_with_probs", "agrees", "float32_scores", "is_sub_quad", "plain_call"]

_PLAIN_KWARGS = frozenset({"mask", "attn_precision", "skip_reshape", "skip_output_reshape", "transformer_options",
                           "_inside_attn_wrapper"})
_QUERY_CHUNKS = (4096, 2048, 1024, 512, 256)  # sub_quad's query chunk sizes, largest first


def is_sub_quad(func: Any) -> bool:
    """Is `func` ComfyUI's attention_sub_quad (the function an attention override receives, or its wrapper), defined
    in ComfyUI's attention module? A function another pack put in its place (to record or change the attention) is
    not: running sub_quad's operations instead would bypass it."""
    wrapper = getattr(comfy_attention, "attention_sub_quad", None)
    if wrapper is None or (func is not wrapper and func is not getattr(wrapper, "__wrapped__", None)):
        return False
    return getattr(func, "__module__", None) == comfy_attention.__name__ and \
        getattr(func, "__name__", None) == "attention_sub_quad"


def plain_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, Any] | None:
    """(q, k, v, heads, attn_precision) of a call q, k, v, heads of (B, tokens, heads * d) tensors of one dtype with
    no mask, no reshape flag and no other option; else None. (The observer has checked q's and k's batch and
    token sizes against the block's: it calls this for an armed layer only.)"""
    if len(args) != 4 or not kwargs.keys() <= _PLAIN_KWARGS:
        return None
    if kwargs.get("mask") is not None or kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape"):
        return None
    q, k, v, heads = args
    if type(heads) is not int or not (torch.is_tensor(q) and torch.is_tensor(k) and torch.is_tensor(v)):
        return None
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or not q.dtype == k.dtype == v.dtype:
        return None
    width = q.shape[2]
    if heads < 1 or width % heads or k.shape[2] != width or v.shape != k.shape or q.shape[0] != k.shape[0]:
        return None
    return q, k, v, heads, kwargs.get("attn_precision")


def float32_scores(dtype: torch.dtype, attn_precision: Any) -> bool | None:
    """Whether sub_quad upcasts q and k of this dtype to score them (False: they are float32 already), or None
    where it scores in another precision (then the observer scores the layer itself, in float32)."""
    upcast = comfy_attention.get_attn_precision(attn_precision, dtype) == torch.float32 and dtype != torch.float32
    return upcast if upcast or dtype == torch.float32 else None


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool, *,
                         read_memory: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sub_quad's output (B, q_tokens, heads * d), the float32 probabilities (B * heads, q_tokens, k_tokens)),
    or None where sub_quad would chunk. upcast: float32_scores of the call (the caller has found it not None).
    read_memory=False: the caller knows the problem is too small to chunk (agrees' problem), and the free-memory
    reading that decides it is skipped."""
    b, q_tokens, width = q.shape
    d = width // heads
    k_tokens = k.shape[1]
    if read_memory:
        bytes_per_token = 4  # float32 scores, either way
        mem_free_total, _ = model_management.get_free_memory(q.device, True)
        chunk = next((x for x in _QUERY_CHUNKS
                      if mem_free_total / (b * heads * bytes_per_token * x * 4.0) >= k_tokens), None)
        if chunk is None or q_tokens > chunk:
            return None  # sub_quad would split the keys or the queries: its sums would run in another order
    query = q.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)
    value = v.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)
    key_t = k.reshape(b, -1, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, -1)
    # sub_quad upcasts, and scores, with CUDA autocast off
    with torch.autocast(enabled=False, device_type="cuda") if upcast else contextlib.nullcontext():
        if upcast:
            query, key_t = query.float(), key_t.float()
        scores = torch.baddbmm(torch.empty(1, 1, 1, device=query.device, dtype=query.dtype), query, key_t,
                               alpha=d ** -0.5, beta=0)
    probs = scores.softmax(dim=-1)
    out = torch.bmm(probs.to(value.dtype), value).to(q.dtype)
    return out.unflatten(0, (-1, heads)).transpose(1, 2).flatten(start_dim=2), probs


def agrees(func: Any, upcast: bool) -> bool:
    """Does attention_with_probs give what `func` (ComfyUI's attention_sub_quad) gives, bit for bit, on a small CPU
    problem: in float32, or (upcast) from bfloat16 with float32 attention precision? Reads no device value."""
    generator = torch.Generator().manual_seed(3)
    dtype, precision = (torch.bfloat16, torch.float32) if upcast else (torch.float32, None)
    q, k, v = (torch.randn(2, n, 8, generator=generator).to(dtype) for n in (6, 5, 5))
    if float32_scores(dtype, precision) is not upcast:
        return False  # upcasting switched off (ComfyUI's --dont-upcast-attention): the observer scores as before
    mine = attention_with_probs(q, k, v, 2, upcast, read_memory=False)  # 6 queries of 5 keys: one chunk for any memory
    assert mine is not None
    try:
        theirs = func(q, k, v, 2, attn_precision=precision)
    except Exception:  # noqa: BLE001 - a changed signature: not the restated function
        return False
    return bool(torch.is_tensor(theirs) and theirs.dtype == mine[0].dtype and torch.equal(theirs, mine[0]))
