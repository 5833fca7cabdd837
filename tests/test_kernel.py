"""The Triton kernel (through the interpreter) against the PyTorch reference, on fresh random inputs."""
import pytest
import torch

from kernels.attention import INTERPRET, masked_attention, masked_attention_reference, masked_attention_triton

# Max abs error allowed against an fp32 reference computed from the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
SHAPES = [  # batch, heads, kv heads, q length, k length, head_dim
    (2, 4, 2, 37, 37, 16),
    (1, 3, 1, 70, 70, 64),   # lengths that are not multiples of the block
    (3, 4, 4, 33, 33, 64),   # plain multi-head attention
    (2, 6, 3, 5, 12, 16),    # queries after a KV cache
    (1, 2, 2, 1, 1, 16),
]


def inputs(batch, heads, kv, q_len, k_len, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv, k_len, dim, generator=g).to(dtype)
    return q, k, v, torch.rand(batch, heads, generator=g) < 0.5


def test_tests_run_the_kernel_through_the_interpreter():
    assert INTERPRET


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(shape, dtype):
    q, k, v, mask = inputs(*shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    out = masked_attention_triton(q, k, v, mask)
    ref = masked_attention_reference(q.float(), k.float(), v.float(), mask)
    assert out.dtype == dtype and out.shape == (shape[0], shape[3], shape[1], shape[5])
    assert (out.float() - ref).abs().max().item() < TOLERANCE[dtype]
    assert (out.transpose(1, 2)[mask] == 0).all()           # masked heads write exact zeros
    assert (out.transpose(1, 2)[~mask].abs().sum((-1, -2)) > 0).all()


@pytest.mark.parametrize("masked", [True, False])
def test_all_or_none_masked(masked):
    q, k, v, _ = inputs(2, 4, 2, 40, 40, 64, torch.float32, seed=1)
    mask = torch.full((2, 4), masked)
    out = masked_attention(q, k, v, mask)
    if masked:
        assert (out == 0).all()
    else:
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, plain.transpose(1, 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked_attention(q, k, v), out)  # no mask = nothing masked


def test_one_head_set_for_all_rows_broadcasts():
    q, k, v, _ = inputs(3, 4, 2, 20, 20, 16, torch.float32, seed=2)
    heads = torch.tensor([True, False, False, True])
    torch.testing.assert_close(masked_attention(q, k, v, heads), masked_attention(q, k, v, heads.expand(3, 4)))


def test_kernel_refuses_autograd():
    q, k, v, mask = inputs(1, 2, 1, 8, 8, 16, torch.float32, seed=3)
    with pytest.raises(RuntimeError, match="inference only"):
        masked_attention_triton(q.requires_grad_(), k, v, mask)


def model_mask(batch, q_len, k_len, window=None, lengths=None):
    """A mask as transformers builds it, by loops: query i (at key position i + k_len - q_len) sees key j when
    j <= its position, j is within the window, and j is not padding of its row. True = attend."""
    mask = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            pos = i + k_len - q_len
            for j in range(k_len):
                mask[b, 0, i, j] = j <= pos and (window is None or j > pos - window) and \
                    (lengths is None or j < lengths[b])
    return mask


@pytest.mark.parametrize("case", ["window", "window, padded", "softcap", "softcap and window", "cache and window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_honours_the_models_mask_and_softcap(case, dtype):
    q_len, k_len = (6, 40) if "cache" in case else (45, 45)
    q, k, v, heads = inputs(3, 4, 2, q_len, k_len, 32, dtype, seed=7)
    window = 9 if "window" in case else None
    lengths = [45, 30, 17] if "padded" in case else None
    mask = model_mask(3, q_len, k_len, window, lengths) if window else None
    softcap = 1.5 if "softcap" in case else None
    out = masked_attention_triton(q, k, v, heads, None, mask, softcap)
    ref = masked_attention_reference(q.float(), k.float(), v.float(), heads, None, mask, softcap)
    assert (out.float() - ref).abs().max().item() < TOLERANCE[dtype]
    # the mask and the cap change the result (the test would catch a kernel that ignored them)
    plain = masked_attention_reference(q.float(), k.float(), v.float(), heads)
    assert (plain - ref).abs().max().item() > 0.05


def test_reference_softcap_is_gemma2s_formula():
    q, k, v, _ = inputs(1, 2, 1, 7, 7, 16, torch.float32, seed=8)
    cap, scale = 2.0, 16 ** -0.5
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = cap * torch.tanh(q @ kk.transpose(-1, -2) * scale / cap)
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    expected = (torch.softmax(scores, -1) @ vv).transpose(1, 2)
    torch.testing.assert_close(masked_attention_reference(q, k, v, softcap=cap), expected, atol=1e-6, rtol=1e-5)


def test_a_query_whose_window_hides_a_whole_block_of_keys():
    # window 3 on 100 keys: with 32-key blocks, the last queries' first blocks hold no visible key at all
    q, k, v, heads = inputs(1, 2, 2, 100, 100, 16, torch.float32, seed=9)
    mask = model_mask(1, 100, 100, window=3)
    out = masked_attention_triton(q, k, v, heads, None, mask)
    assert torch.isfinite(out).all()
    assert (out.float() - masked_attention_reference(q, k, v, heads, None, mask)).abs().max().item() < 1e-5
