"""The compiled CPU kernels against PyTorch's products and attention, and where they hand over to PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from tp_infer.model import kernels

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler or no AVX2 here")


@pytest.fixture
def switched_on():
    yield
    kernels.set_enabled(True)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 12, 13, 16, 23, 24])  # past MAX_ROWS: in two calls
@pytest.mark.parametrize(("n", "k"), [(64, 32), (33, 77), (5, 8), (130, 3)])
def test_small_matmul_matches_linear(rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
    assert torch.allclose(kernels.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_linear_hands_over_to_pytorch(switched_on):
    w = torch.randn(16, 32)
    x = torch.randn(kernels.SPLIT_ROWS + 1, 32)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))  # more rows than the kernel takes
    assert torch.equal(kernels.linear(x[:2].bfloat16(), w.bfloat16()), F.linear(x[:2].bfloat16(), w.bfloat16()))
    strided = w.t().contiguous().t()
    assert torch.equal(kernels.linear(x[:2], strided), F.linear(x[:2], strided))
    kernels.set_enabled(False)
    assert torch.equal(kernels.linear(x[:2], w), F.linear(x[:2], w))


def test_linear_takes_strided_rows():
    x, w = torch.randn(4, 64)[:, ::2], torch.randn(8, 32)
    assert torch.allclose(kernels.linear(x, w), F.linear(x, w), atol=1e-5)


def reference_decode(q_nope, q_pe, wkv_b, latent, pe, block_table, lengths, scale):
    """The same attention in float64 through PyTorch: each row's blocks gathered and cut at its length."""
    nope = q_nope.shape[-1]
    w_k, w_v = wkv_b[:, :nope].double(), wkv_b[:, nope:].double()
    outs = []
    for r, length in enumerate(lengths.tolist()):
        keys = latent[block_table[r]].flatten(0, 1)[:length].double()
        rope = pe[block_table[r]].flatten(0, 1)[:length].double()
        q_latent = torch.einsum("hd,hdc->hc", q_nope[r].double(), w_k)
        scores = (q_latent @ keys.T + q_pe[r].double() @ rope.T) * scale
        outs.append(torch.einsum("hc,hvc->hv", scores.softmax(-1) @ keys, w_v))
    return torch.stack(outs).float()


@pytest.mark.parametrize(
    ("heads", "nope", "v_dim", "latent_dim", "rope_dim"),
    [(8, 16, 16, 64, 16), (3, 8, 12, 32, 8), (16, 5, 7, 48, 4), (9, 32, 16, 16, 12)],
)
def test_mla_decode_matches_gathered_attention(heads, nope, v_dim, latent_dim, rope_dim):
    generator = torch.Generator().manual_seed(heads * latent_dim + rope_dim)
    num_blocks, block_size = 12, 4
    latent = torch.randn(num_blocks, block_size, latent_dim, generator=generator)
    pe = torch.randn(num_blocks, block_size, rope_dim, generator=generator)
    wkv_b = torch.randn(heads, nope + v_dim, latent_dim, generator=generator) * 0.2
    # scattered, shared and repeated blocks; lengths from one position to every position of the table
    block_table = torch.tensor([[7, 2, 9, 0, 0], [3, 4, 5, 6, 11], [1, 0, 0, 0, 0], [8, 2, 10, 1, 0]])
    lengths = torch.tensor([10, 5 * block_size, 1, 13])
    q = torch.randn(4, heads, nope + rope_dim, generator=generator)
    q_nope, q_pe = q.split([nope, rope_dim], dim=-1)  # strided views, as the model passes them
    out = kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, block_table, lengths, 0.3)
    expected = reference_decode(q_nope, q_pe, wkv_b, latent, pe, block_table, lengths, 0.3)
    assert out is not None and torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_mla_decode_refuses_what_it_does_not_cover(switched_on):
    heads, nope, v_dim, rope_dim = 2, 4, 4, 8
    q_nope, q_pe, table, lengths = (
        torch.randn(1, heads, nope),
        torch.randn(1, heads, rope_dim),
        torch.tensor([[0, 1]]),
        torch.tensor([5]),
    )
    pe = torch.randn(2, 4, rope_dim)
    # 24 latent dimensions: not a multiple of 16
    latent, wkv_b = torch.randn(2, 4, 24), torch.randn(heads, nope + v_dim, 24)
    assert kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, table, lengths, 1.0) is None
    latent, wkv_b = torch.randn(2, 4, 32), torch.randn(heads, nope + v_dim, 32)
    assert kernels.mla_decode(q_nope.bfloat16(), q_pe, wkv_b, latent, pe, table, lengths, 1.0) is None
    kernels.set_enabled(False)
    assert kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, table, lengths, 1.0) is None
    kernels.set_enabled(True)
    assert kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, table, lengths, 1.0) is not None
    with pytest.raises(AssertionError, match="lengths"):
        kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, table, torch.tensor([9]), 1.0)


def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = list((tmp_path / "tp_infer").iterdir())
        assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so", built
    finally:
        kernels.library.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    try:
        assert kernels.library() is None
        assert torch.equal(kernels.linear(torch.ones(1, 4), torch.ones(2, 4)), torch.full((1, 2), 4.0))
    finally:
        kernels.library.cache_clear()
