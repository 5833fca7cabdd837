"""The Triton kernel (through the interpreter) against the PyTorch reference, on fresh random inputs."""
import pytest
import torch

from headmap.attention import INTERPRET, key_ranges, masked_attention, masked_attention_reference, masked_attention_triton

# Max abs error allowed against an fp32 reference computed from the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
SHAPES = [  # batch, heads, kv heads, q length, k length, head_dim
    (2, 4, 2, 37, 37, 16),
    (1, 3, 1, 70, 70, 64),   # lengths that are not multiples of the block
    (3, 4, 4, 33, 33, 64),   # plain multi-head attention
    (2, 6, 3, 5, 12, 16),    # queries after a KV cache
    (1, 2, 2, 1, 1, 16),
    (1, 2, 1, 70, 70, 24),   # a head_dim that is not a power of two: padded to 32, bounds checked
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


def model_mask(batch, q_len, k_len, window=None, lengths=None, left=None):
    """A mask as transformers builds it, by loops: query i (at key position i + k_len - q_len) sees key j when
    j <= its position, j is within the window, and j is not padding of its row (right padding: j < lengths[b];
    left padding: j >= left[b]). True = attend."""
    mask = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            pos = i + k_len - q_len
            for j in range(k_len):
                mask[b, 0, i, j] = j <= pos and (window is None or j > pos - window) and \
                    (lengths is None or j < lengths[b]) and (left is None or j >= left[b])
    return mask


CASES = ["window", "window, padded", "softcap", "softcap and window", "cache and window", "padded", "left padded",
         "left padded, window", "cache, left padded"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_honours_the_models_mask_and_softcap(case, dtype):
    q_len, k_len = (6, 40) if "cache" in case else (70, 70)
    q, k, v, heads = inputs(3, 4, 2, q_len, k_len, 32, dtype, seed=7)
    window = 9 if "window" in case else None
    lengths = [70, 30, 17] if "padded" in case and "left" not in case else None
    left = [0, 33, 50] if "left" in case else None
    mask = model_mask(3, q_len, k_len, window, lengths, left) if window or lengths or left else None
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


def test_key_ranges_of_a_mask_by_hand():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lo, hi, contiguous = key_ranges(mask)
    assert lo.tolist() == [0, 0, 1, 0] and hi.tolist() == [1, 2, 3, 0] and contiguous
    holes = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert key_ranges(holes)[2] is False  # row 0 sees keys 0 and 2, not 1: the kernel must read this mask


def test_key_ranges_are_cached_per_mask_and_follow_in_place_edits():
    with torch.inference_mode():  # scoring builds its masks here: inference tensors have no version counter
        mask = torch.ones(4, 4, dtype=torch.bool).tril()
        assert key_ranges(mask) is key_ranges(mask)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    first = key_ranges(mask)
    assert key_ranges(mask) is first
    mask[3, 0] = False  # the model changed its mask in place: the ranges follow
    assert key_ranges(mask)[0].tolist() == [0, 0, 0, 1]


def test_a_mask_with_holes_and_one_per_head_is_read_densely():
    q, k, v, heads = inputs(2, 4, 2, 50, 50, 16, torch.float32, seed=10)
    g = torch.Generator().manual_seed(11)
    mask = (torch.rand(2, 4, 50, 50, generator=g) < 0.7) & torch.ones(50, 50, dtype=torch.bool).tril()
    assert not key_ranges(mask)[2]
    out = masked_attention_triton(q, k, v, heads, None, mask)
    ref = masked_attention_reference(q, k, v, heads, None, mask)
    assert (out - ref).abs().max().item() < 1e-5


def test_per_head_windows_as_ranges():
    q, k, v, heads = inputs(1, 4, 4, 66, 66, 16, torch.float32, seed=12)
    mask = torch.cat([model_mask(1, 66, 66, window=w) for w in (3, 10, 40, None)], dim=1)  # (1, 4, 66, 66)
    assert key_ranges(mask)[2]
    out = masked_attention_triton(q, k, v, heads, None, mask)
    assert (out - masked_attention_reference(q, k, v, heads, None, mask)).abs().max().item() < 1e-5


def test_fp32_is_exact_fp32_unless_tf32_is_allowed(monkeypatch):
    # the interpreter multiplies in fp32 either way; what is checked is the precision the kernel asks for
    import headmap.attention as attention
    seen = []
    real = attention._masked_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(kw["PRECISION"]) or real[grid](*a, **kw)
    monkeypatch.setattr(attention, "_masked_attention_kernel", Spy())
    q, k, v, heads = inputs(1, 2, 2, 8, 8, 16, torch.float32, seed=13)
    masked_attention_triton(q, k, v, heads)
    masked_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads)
    assert seen == ["ieee", "tf32"]


@pytest.mark.parametrize("tile", [(16, 32), (32, 16), (64, 16)])  # query and key blocks of other shapes than 32 x 32
@pytest.mark.parametrize("case", ["left padded, window", "cache, left padded", "padded"])
def test_stage_boundaries_hold_for_other_tile_shapes(tile, case):
    q_len, k_len = (6, 40) if "cache" in case else (70, 70)
    q, k, v, heads = inputs(3, 4, 2, q_len, k_len, 16, torch.float32, seed=14)
    left = [0, 33, 50] if "left" in case else None
    mask = model_mask(3, q_len, k_len, 9 if "window" in case else None, None if left else [70, 30, 17], left)
    out = masked_attention_triton(q, k, v, heads, None, mask, tile=dict(BLOCK_M=tile[0], BLOCK_N=tile[1]))
    plain = masked_attention_triton(q, k, v, heads, tile=dict(BLOCK_M=tile[0], BLOCK_N=tile[1]))
    assert (out - masked_attention_reference(q, k, v, heads, None, mask)).abs().max().item() < 1e-5
    assert (plain - masked_attention_reference(q, k, v, heads)).abs().max().item() < 1e-5
