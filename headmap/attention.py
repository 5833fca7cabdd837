"""Causal attention that ablates any set of heads, per sequence: a Triton kernel and its PyTorch reference.

    out = masked_attention(q, k, v, head_mask)   # q (B, H, S, D); k, v (B, Hkv, S', D); head_mask (B, H) bool
    out.shape == (B, S, H, D)                     # the layout o_proj reads, so no transpose is needed

A head whose head_mask entry is True outputs zeros (a masked head contributes nothing to o_proj's input); its
key/value head still serves the other query heads of its group. Because the mask is data, one batch can carry a
different head set in every row, and nothing is recompiled between head sets. A masked head's programs load
nothing and loop over nothing, so with a share x of the heads masked the kernel does (1 - x) of the work.

It computes what the model's own attention computes: `scale` (the module's scaling), `softcap` (attention logit
soft-capping, softcap * tanh(scores / softcap), as Gemma 2), and `attn_mask`, the boolean (B or 1, 1 or H, S, S')
mask the model built for the layer (True = attend: sliding windows, padding), or None for the plain causal mask.
Grouped-query layouts are read in place.

Masks become key ranges. Every mask a decoder builds from causality, padding (left or right) and a sliding
window lets each query see one contiguous run of keys, [lo, hi). `key_ranges` finds those runs once per mask
tensor (the model hands the same tensor to every layer of a type) and the kernel then reads two integers per
query instead of a (B, S, S') byte mask. Per block of queries the key blocks split in three stages, as in
FlashAttention-2: blocks before every query's run ends and after every run starts need no mask arithmetic at all;
only the blocks at the edges are masked. A mask whose runs are not contiguous is read densely, in every block.

Dispatch: CUDA tensors run the Triton kernel; CPU tensors run the reference, unless TRITON_INTERPRET=1, which
runs the Triton kernel through Triton's interpreter (how the tests check the kernel on a machine without a GPU).
fp32 inputs multiply in full fp32 unless the user allows TF32 (torch.backends.cuda.matmul.allow_tf32).

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
LOG2E = 1.4426950408889634


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               head_mask: torch.Tensor | None = None, scale: float | None = None,
                               attn_mask: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: scaled_dot_product_attention (or the scores written out, to soft-cap them), then zero the
    masked heads. Same arguments and (B, S, H, D) result as masked_attention."""
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


def key_ranges(attn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """For a boolean mask (..., S, S'), the first visible key `lo` and one past the last `hi` of every query
    (int32, (..., S); a query that sees nothing gets lo = hi = 0), and whether every query sees exactly the keys
    [lo, hi): then the ranges are the whole mask. Cached on the mask tensor, so the layers that share it pay once."""
    # keyed on the version counter, so an in-place edit of the mask is seen (inference tensors have none: cached)
    version = None if attn_mask.is_inference() else attn_mask._version
    cached = attn_mask.__dict__.get("_headmap_key_ranges")
    if cached is not None and cached[0] == version:
        return cached[1]
    k_len = attn_mask.shape[-1]
    any_visible = attn_mask.any(-1)
    lo = attn_mask.int().argmax(-1)  # the first True
    hi = k_len - attn_mask.flip(-1).int().argmax(-1)  # one past the last True
    lo, hi = lo.masked_fill(~any_visible, 0).int(), hi.masked_fill(~any_visible, 0).int()
    contiguous = bool((attn_mask.sum(-1, dtype=torch.int32) == hi - lo).all())
    result = (lo.contiguous(), hi.contiguous(), contiguous)
    attn_mask.__dict__["_headmap_key_ranges"] = (version, result)
    return result


if triton is not None:
    @triton.jit
    def _attend(acc, l_i, m_i, q, k_base, v_base, dense_base, start, n_first, restart, n_blocks, offs_m, offs_n,
                offs_d, lo, hi, stride_ks, stride_vs, stride_aq, stride_ak, k_len, q_len, qk_scale, softcap,
                BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                DENSE: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """Online softmax over n_blocks key blocks: n_first from `start` on, the rest from `restart` on (one loop
        for both edges of the key ranges: one pipelined loop to compile, not two). MASKED: blocks at the edges of the
        queries' key ranges, each score checked against [lo, hi) (and the dense mask); else blocks every query sees."""
        d_ok = offs_d < HEAD_DIM
        for i in range(0, n_blocks):
            start_n = tl.where(i < n_first, start + i * BLOCK_N, restart + (i - n_first) * BLOCK_N)
            cols = start_n + offs_n
            if MASKED:
                k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                              mask=(cols[None, :] < k_len) & d_ok[:, None], other=0.0)
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                            mask=(cols[:, None] < k_len) & d_ok[None, :], other=0.0)
            elif EVEN_D:  # inside every query's range, so inside the keys: no bounds to check
                k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None])
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
            else:
                k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            if DOT_FP32:
                k_t, v = k_t.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # log2 domain: exp2 below
            if SOFTCAP:  # softcap * tanh(x / softcap) on the natural-log scores, tanh(y) = 2 sigmoid(2y) - 1
                cap = softcap * 1.4426950408889634  # the cap in the log2 domain (a jitted function reads no globals)
                s = cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)
            if MASKED:
                visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
                if DENSE:  # a mask that is not one run of keys per query: read it
                    visible &= tl.load(dense_base + offs_m[:, None] * stride_aq + cols[None, :] * stride_ak,
                                       mask=(offs_m[:, None] < q_len) & (cols[None, :] < k_len), other=0) != 0
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key in this block
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = m_new
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v_base.dtype.element_ty)  # P is rounded to the input dtype, as in flash attention
            if DOT_FP32:
                p = p.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    # (BLOCK_M, BLOCK_N, warps, stages) tried per head_dim; 256-wide heads get smaller tiles, or shared memory overflows
    TILES = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             256: [(64, 32, 8, 2)]}

    def tiles_for(head_dim: int) -> list[dict]:
        """The launch configurations the kernel is tuned over for this head_dim (the interpreter: one)."""
        if INTERPRET:  # bigger blocks mean fewer programs, and the interpreter pays per program
            return [dict(BLOCK_M=32, BLOCK_N=32)]
        tiles = TILES[64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in tiles]

    def _as_config(tile: dict):
        meta = {k: v for k, v in tile.items() if k.startswith("BLOCK")}
        return triton.Config(meta, **{k: v for k, v in tile.items() if not k.startswith("BLOCK")})

    def _prune(configs, named_args, **kwargs):
        keep = [_as_config(t) for t in tiles_for({**named_args, **kwargs}["HEAD_DIM"])]
        return [c for c in configs if any(c.kwargs == k.kwargs and c.num_warps == k.num_warps for k in keep)]

    @triton.autotune(configs=[_as_config(dict(t)) for t in dict.fromkeys(tuple(t.items()) for d in TILES
                                                                                 for t in tiles_for(d))],
                     key=["q_bucket", "k_bucket", "HEAD_DIM", "RANGES", "DENSE", "SOFTCAP"],
                     prune_configs_by={"early_config_prune": _prune})
    # lengths, head counts and the mask's strides vary from call to call: compiled once, not once per value class
    @triton.jit(do_not_specialize=["stride_mb", "stride_mh", "stride_rb", "stride_rh", "stride_ab", "stride_ah",
                                   "stride_aq", "stride_ak", "n_heads", "group", "q_len", "k_len", "q_bucket",
                                   "k_bucket"])
    def _masked_attention_kernel(
        Q, K, V, Out, HeadMask, Lo, Hi, Dense,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_os, stride_oh, stride_mb, stride_mh,
        stride_rb, stride_rh, stride_ab, stride_ah, stride_aq, stride_ak,
        n_heads, group, q_len, k_len, qk_scale, softcap, q_bucket, k_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, RANGES: tl.constexpr, DENSE: tl.constexpr,
        SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        # the last query blocks have the most keys: they start first, so the short ones fill the tail
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        b = tl.program_id(1) // n_heads
        h = tl.program_id(1) % n_heads
        kv = h // group  # grouped-query attention: query head h reads key/value head h // group
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_len
        live = tl.load(HeadMask + b * stride_mb + h * stride_mh) == 0

        # each query's visible keys [lo, hi): from the mask's ranges, else causal (query i sits at key i + offset)
        if RANGES:
            lo = tl.load(Lo + b * stride_rb + h * stride_rh + offs_m, mask=row_ok, other=0)
            hi = tl.load(Hi + b * stride_rb + h * stride_rh + offs_m, mask=row_ok, other=0)
        else:
            lo = tl.zeros([BLOCK_M], tl.int32)
            hi = tl.minimum(offs_m + (k_len - q_len) + 1, k_len)
        # the block's keys: [first, last) holds every query's range; [full_lo, full_hi) lies inside all of them
        first = tl.min(tl.where(row_ok, lo, k_len), 0) // BLOCK_N * BLOCK_N
        last = tl.max(tl.where(row_ok, hi, 0), 0)
        last = tl.where(live, last, 0)  # a masked head sees no key: its accumulator stays zero, zeros are written
        full_lo = tl.minimum(tl.cdiv(tl.max(tl.where(row_ok, lo, 0), 0), BLOCK_N) * BLOCK_N, tl.cdiv(last, BLOCK_N) * BLOCK_N)
        full_lo = tl.maximum(full_lo, first)
        full_hi = tl.min(tl.where(row_ok, hi, k_len), 0) // BLOCK_N * BLOCK_N
        if DENSE:  # every block reads the mask
            full_lo = tl.cdiv(last, BLOCK_N) * BLOCK_N
        full_hi = tl.maximum(tl.minimum(full_hi, last), full_lo)

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=(offs_m[:, None] < tl.where(live, q_len, 0)) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + kv * stride_kh
        v_base = V + b * stride_vb + kv * stride_vh
        dense_base = Dense + b * stride_ab + h * stride_ah
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_lead = (full_lo - first) // BLOCK_N  # masked blocks before the unmasked run, then those after it
        n_edge = n_lead + tl.cdiv(last - full_hi, BLOCK_N)
        n_full = (full_hi - full_lo) // BLOCK_N
        # stage 1: the blocks every query of the block sees whole, [full_lo, full_hi): no mask arithmetic
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, dense_base,
                                start=full_lo, n_first=n_full, restart=full_lo, n_blocks=n_full,
                                offs_m=offs_m, offs_n=offs_n, offs_d=offs_d, lo=lo, hi=hi,
                                stride_ks=stride_ks, stride_vs=stride_vs, stride_aq=stride_aq, stride_ak=stride_ak,
                                k_len=k_len, q_len=q_len, qk_scale=qk_scale, softcap=softcap,
                                BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, HEAD_DIM=HEAD_DIM, MASKED=False,
                                DENSE=DENSE, SOFTCAP=SOFTCAP, PRECISION=PRECISION, DOT_FP32=DOT_FP32)
        # stage 2: the edge blocks, before and after that run, each score checked against the queries' key ranges
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, dense_base,
                                start=first, n_first=n_lead, restart=full_hi, n_blocks=n_edge,
                                offs_m=offs_m, offs_n=offs_n, offs_d=offs_d, lo=lo, hi=hi,
                                stride_ks=stride_ks, stride_vs=stride_vs, stride_aq=stride_aq, stride_ak=stride_ak,
                                k_len=k_len, q_len=q_len, qk_scale=qk_scale, softcap=softcap,
                                BLOCK_N=BLOCK_N, EVEN_D=EVEN_D, HEAD_DIM=HEAD_DIM, MASKED=True,
                                DENSE=DENSE, SOFTCAP=SOFTCAP, PRECISION=PRECISION, DOT_FP32=DOT_FP32)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def masked_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            head_mask: torch.Tensor | None = None, scale: float | None = None,
                            attn_mask: torch.Tensor | None = None, softcap: float | None = None,
                            tile: dict | None = None) -> torch.Tensor:
    """The Triton kernel; arguments and result as masked_attention. `tile`: one of tiles_for(head_dim) to launch
    with instead of the tuned choice (how tests and bench/gpu.py check every configuration)."""
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
    ranges = dense = None
    if attn_mask is not None:
        lo, hi, contiguous = key_ranges(attn_mask)
        ranges = (lo.expand(batch, n_heads, q_len), hi.expand(batch, n_heads, q_len))  # broadcast dims: stride 0
        if not contiguous:  # bool as bytes
            dense = attn_mask.view(torch.int8).expand(batch, n_heads, q_len, k_len)
    unused = torch.zeros(1, 1, 1, 1, dtype=torch.int8, device=q.device)
    lo, hi = ranges if ranges is not None else (unused[0], unused[0])
    dense = dense if dense is not None else unused
    out = torch.empty(batch, q_len, n_heads, head_dim, dtype=q.dtype, device=q.device)
    scale = head_dim ** -0.5 if scale is None else scale
    tf32 = q.dtype != torch.float32 or (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)

    def grid(meta):
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads

    kernel = _masked_attention_kernel if tile is None else _masked_attention_kernel.fn
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():  # Triton launches on the current GPU
        kernel[grid](
            q, k, v, out, head_mask, lo, hi, dense,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            head_mask.stride(0), head_mask.stride(1), lo.stride(0), lo.stride(1), *dense.stride(),
            n_heads, n_heads // n_kv, q_len, k_len, scale * LOG2E, float(softcap or 0.0),
            # the tuned tile sizes are kept per power-of-two length, not per length: locate's batches vary in length
            triton.next_power_of_2(q_len), triton.next_power_of_2(k_len),
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # EVEN_D: BLOCK_D is HEAD_DIM
            PRECISION="tf32" if tf32 else "ieee",
            # Triton's interpreter multiplies bf16 tiles wrongly (numpy has no bf16), so there the tiles are
            # widened to fp32 after loading; on a GPU tl.dot runs on bf16 tensor cores.
            DOT_FP32=INTERPRET and q.dtype == torch.bfloat16, RANGES=ranges is not None, DENSE=dense is not unused,
            SOFTCAP=bool(softcap), EVEN_D=triton.next_power_of_2(head_dim) == head_dim >= 16, **(tile or {}))
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_mask: torch.Tensor | None = None,
                     scale: float | None = None, attn_mask: torch.Tensor | None = None,
                     softcap: float | None = None) -> torch.Tensor:
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
