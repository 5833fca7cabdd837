"""Causal attention that ablates any set of heads, per sequence: a Triton kernel and its PyTorch reference.

    out = masked_attention(q, k, v, head_mask)   # q (B, H, S, D); k, v (B, Hkv, S, D); head_mask (B, H) bool
    out.shape == (B, S, H, D)                     # the layout o_proj reads, so no transpose is needed

A head whose head_mask entry is True outputs zeros (PROTOCOL.md: a masked head contributes nothing); its
key/value head still serves the other query heads of its group. Because the mask is data, one batch can carry a
different head set in every row, and nothing is recompiled between head sets.

It computes what the model's own attention computes: `scale` (the module's scaling), `softcap` (attention logit
soft-capping, softcap * tanh(scores / softcap), as Gemma 2), and `attn_mask`, the boolean (B or 1, 1 or H, S, S')
mask the model built for the layer (True = attend: sliding windows, padding), or None for the plain causal
mask. Grouped-query layouts are read in place.

Dispatch: CUDA tensors run the Triton kernel; CPU tensors run the reference, unless TRITON_INTERPRET=1, which
runs the Triton kernel through Triton's interpreter (how the tests check the kernel on a machine without a GPU).

Inference only: the kernel has no backward pass. Fine-tuning masks no heads and uses the model's stock attention.
"""
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: CPU tensors still work through the reference
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def masked_attention_reference(q, k, v, head_mask=None, scale=None, attn_mask=None, softcap=None):
    """Plain PyTorch: scaled_dot_product_attention (or the scores written out, to soft-cap them), then zero the
    masked heads."""
    q_len, k_len = q.shape[2], k.shape[2]
    if attn_mask is None:  # queries are the last q_len positions (a KV cache holds the keys before them)
        attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if softcap:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~attn_mask, float("-inf"))
        # a query that sees no key (a padded row under a window) gets zeros, as from SDPA and the kernel, not NaN:
        # later layers read it as a masked key, and a NaN there would spread through the zero weight
        out = (torch.softmax(scores, -1).nan_to_num(0.0) @ v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    if head_mask is not None:
        out = out.masked_fill(head_mask.to(torch.bool)[:, :, None, None], 0.0)
    return out.transpose(1, 2).contiguous()  # (B, S, H, D) in memory, as the kernel writes it: callers .view() it


if triton is not None:
    @triton.jit
    def _masked_attention_kernel(
        Q, K, V, Out, HeadMask, AttnMask,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_os, stride_oh, stride_mb, stride_mh,
        stride_ab, stride_ah, stride_aq, stride_ak,
        n_heads, group, q_len, k_len, qk_scale, softcap,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        b = tl.program_id(1) // n_heads
        h = tl.program_id(1) % n_heads
        kv = h // group  # grouped-query attention: query head h reads key/value head h // group
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        offset = k_len - q_len  # query i sits at key position i + offset

        # Causal: this block of queries sees keys [0, hi). A masked head sees none, so it does no work and
        # its accumulator stays zero: the program writes zeros.
        hi = tl.minimum(k_len, (start_m + 1) * BLOCK_M + offset)
        ablated = tl.load(HeadMask + b * stride_mb + h * stride_mh)
        hi = tl.where(ablated != 0, 0, hi)

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + kv * stride_kh
        v_base = V + b * stride_vb + kv * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                          mask=(cols[None, :] < k_len) & d_ok[:, None], other=0.0)
            if DOT_FP32:
                k_t = k_t.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # log2 domain: exp2 below
            if SOFTCAP:  # softcap * tanh(x / softcap) on the natural-log scores, tanh(y) = 2 sigmoid(2y) - 1
                s = softcap * 1.4426950408889634 * (2.0 * tl.sigmoid(2.0 * s / (softcap * 1.4426950408889634)) - 1.0)
            if HAS_MASK:  # the model's own mask for this layer: sliding window, padding
                visible = tl.load(AttnMask + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_aq
                                  + cols[None, :] * stride_ak,
                                  mask=(offs_m[:, None] < q_len) & (cols[None, :] < k_len), other=0) != 0
            else:
                visible = (cols[None, :] <= offs_m[:, None] + offset) & (cols[None, :] < k_len)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a window can hide a whole block of keys
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                        mask=(cols[:, None] < k_len) & d_ok[None, :], other=0.0)
            p = p.to(V.dtype.element_ty)  # P is rounded to the input dtype, as in flash attention
            if DOT_FP32:
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & d_ok[None, :])


def _launch_config(head_dim: int) -> dict:
    if INTERPRET:  # bigger blocks mean fewer programs, and the interpreter pays per program
        return dict(BLOCK_M=32, BLOCK_N=32)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def masked_attention_triton(q, k, v, head_mask=None, scale=None, attn_mask=None, softcap=None):
    if triton is None:
        raise RuntimeError("masked attention on this device needs Triton: pip install triton")
    if q.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("the masked-attention kernel is inference only (no backward); run under torch.no_grad()")
    batch, n_heads, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if head_mask is None:
        head_mask = torch.zeros(1, 1, dtype=torch.int8, device=q.device)
    head_mask = head_mask.to(device=q.device, dtype=torch.int8).expand(batch, n_heads)
    if attn_mask is None:
        attn = torch.ones(1, 1, 1, 1, dtype=torch.int8, device=q.device)  # not read: HAS_MASK is off
    else:  # bool as bytes, broadcast dims with stride 0
        attn = attn_mask.to(device=q.device).view(torch.int8).expand(batch, n_heads, q_len, k_len)
    out = torch.empty(batch, q_len, n_heads, head_dim, dtype=q.dtype, device=q.device)
    cfg = _launch_config(head_dim)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * n_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():  # Triton launches on the current GPU
        _masked_attention_kernel[grid](
            q, k, v, out, head_mask, attn,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            head_mask.stride(0), head_mask.stride(1), *attn.stride(),
            n_heads, n_heads // n_kv, q_len, k_len, scale * 1.4426950408889634, float(softcap or 0.0),
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # Triton's interpreter multiplies bf16 tiles wrongly (numpy has no bf16), so there the tiles are
            # widened to fp32 after loading; on a GPU tl.dot runs on bf16 tensor cores.
            DOT_FP32=INTERPRET and q.dtype == torch.bfloat16, HAS_MASK=attn_mask is not None, SOFTCAP=bool(softcap),
            **cfg)
    return out


def masked_attention(q, k, v, head_mask=None, scale=None, attn_mask=None, softcap=None):
    """Attention with heads ablated per sequence. q (B, H, S, D), k/v (B, Hkv, S', D), head_mask (B, H) or (H,)
    bool with True = ablated; attn_mask None (causal) or bool (B or 1, 1 or H, S, S') with True = attend;
    softcap None or the logit soft-cap. Returns (B, S, H, D)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
    if q.is_cuda or (INTERPRET and q.device.type == "cpu"):
        return masked_attention_triton(q, k, v, head_mask, scale, attn_mask, softcap)
    if head_mask is not None:
        head_mask = head_mask.expand(q.shape[0], q.shape[1])
    return masked_attention_reference(q, k, v, head_mask, scale, attn_mask, softcap)
