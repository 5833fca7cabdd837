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
