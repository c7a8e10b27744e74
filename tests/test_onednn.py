"""oneDNN's products (kernels.linear past the row kernels) and the attention built on them, against float64."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tp_infer.backends import cpu
from tp_infer.backends.cpu import chunked_attention, latent_attention
from tp_infer.kv.pool import LayerCache
from tp_infer.model import kernels
from tp_infer.model.batch import AttentionGroup

pytestmark = pytest.mark.skipif(not kernels.onednn_products(), reason="this PyTorch has no oneDNN product")


@pytest.fixture
def switched_on():
    yield
    kernels.set_enabled(True)


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")


@pytest.mark.parametrize("rows", [kernels.MAX_ROWS + 1, 100, 300])
def test_linear_takes_wide_products_to_onednn(rows):
    generator = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=generator), torch.randn(40, 96, generator=generator)
    expected = x.double() @ w.double().T
    for weight in (w, w.t().contiguous().t()):  # contiguous, and the transpose of a contiguous matrix
        y = kernels.linear(x, weight)
        assert torch.equal(y, onednn(x, weight))
        assert torch.allclose(y.double(), expected, atol=1e-4)
    few = kernels.linear(x[:2], w.t().contiguous().t())  # a weight the row kernels do not read goes there too
    assert torch.equal(few, onednn(x[:2], w.t().contiguous().t()))


def test_linear_leaves_other_operands_to_pytorch(switched_on):
    generator = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 32, generator=generator), torch.randn(16, 64, generator=generator)
    strided = w[:, ::2]  # neither contiguous nor a transpose of a contiguous matrix: oneDNN's slow path
    assert torch.equal(kernels.linear(x, strided), F.linear(x, strided))
    assert torch.equal(kernels.linear(x.bfloat16(), w[:, :32].bfloat16()), F.linear(x.bfloat16(), w[:, :32].bfloat16()))
    kernels.set_enabled(False)
    assert torch.equal(kernels.linear(x, w[:, :32]), F.linear(x, w[:, :32]))


def group_of(rows: int, width: int, lengths: list[int], block_size: int = 16) -> AttentionGroup:
    """An attention group as the runner builds it: row r's new tokens end at lengths[r]; blocks 0, 1, ... in order."""
    nb = -(-max(lengths) // block_size)
    positions = torch.tensor([[n - width + i for i in range(width)] for n in lengths])
    visible = torch.arange(nb * block_size) <= positions[:, :, None]
    table = torch.arange(rows * nb).view(rows, nb)
    causal = all(n == width for n in lengths)
    return AttentionGroup(0, rows, width, table, visible, torch.tensor(lengths), causal)


def reference(q, k, v, visible, scale):
    """Softmax attention in float64 over the visible keys: q [R, T, H, D], k [R, S, H, D], v [R, S, H, V]."""
    scores = torch.einsum("rthd,rshd->rhts", q.double(), k.double()) * scale
    scores = scores.masked_fill(~visible[:, None, :, : k.shape[1]], float("-inf"))
    return torch.einsum("rhts,rshv->rthv", scores.softmax(-1), v.double())


# a causal prefill over several query chunks; a wide row over a history; decode-shaped rows of different lengths
CASES = [(1, 600, [600]), (1, 300, [800]), (3, 1, [5, 40, 17])]


@pytest.mark.parametrize(("rows", "width", "lengths"), CASES)
@pytest.mark.parametrize("chunk", [cpu.QUERY_CHUNK, 100])
@pytest.mark.parametrize(("dim", "v_dim"), [(24, 8), (32, 16)])  # in products; in kernels.extend_attention
def test_chunked_attention_matches_float64(monkeypatch, rows, width, lengths, chunk, dim, v_dim):
    monkeypatch.setattr(cpu, "QUERY_CHUNK", chunk)
    generator = torch.Generator().manual_seed(width + chunk)
    group = group_of(rows, width, lengths)
    keys = group.visible.shape[-1]
    q = torch.randn(rows, width, 4, dim, generator=generator)
    k, v = torch.randn(rows, keys, 4, dim, generator=generator), torch.randn(rows, keys, 4, v_dim, generator=generator)
    out = chunked_attention(q, k, v, group, 0.2)
    assert torch.allclose(out.double(), reference(q, k, v, group.visible, 0.2), atol=1e-5)


@pytest.mark.parametrize(("rows", "width", "lengths"), CASES)
@pytest.mark.parametrize("rope_dim", [8, 16])  # in products; in kernels.extend_attention
def test_latent_attention_matches_float64(rows, width, lengths, rope_dim):
    generator = torch.Generator().manual_seed(width)
    heads, nope, v_dim, latent_dim, block_size = 4, 16, 8, 32, 16
    group = group_of(rows, width, lengths, block_size)
    blocks = group.block_table.numel()
    cache = LayerCache(blocks, block_size, [(latent_dim,), (rope_dim,)], torch.float32, torch.device("cpu"))
    latent = torch.randn(blocks * block_size, latent_dim, generator=generator)
    pe = torch.randn(blocks * block_size, rope_dim, generator=generator)
    cache.write(torch.arange(blocks * block_size), latent, pe)
    wkv_b = torch.randn(heads, nope + v_dim, latent_dim, generator=generator) * 0.2
    q_nope = torch.randn(rows, width, heads, nope, generator=generator)
    q_pe = torch.randn(rows, width, heads, rope_dim, generator=generator)
    mla = SimpleNamespace(nope_dim=nope, rope_dim=rope_dim, v_dim=v_dim, softmax_scale=0.3)
    cached_latent, cached_pe = cache.read(group.block_table, torch.float32)
    out = latent_attention(mla, torch.cat([q_nope, q_pe], -1), wkv_b, cached_latent, cached_pe, group)
    # the same attention expanded: per-head keys (nope part from the latent, rope key shared) and values
    cached = latent.view(rows, -1, latent_dim)
    k = torch.cat(
        [
            torch.einsum("rsc,hdc->rshd", cached, wkv_b[:, :nope]),
            pe.view(rows, -1, 1, rope_dim).expand(-1, -1, heads, -1),
        ],
        dim=-1,
    )
    v = torch.einsum("rsc,hvc->rshv", cached, wkv_b[:, nope:])
    expected = reference(torch.cat([q_nope, q_pe], -1), k, v, group.visible, 0.3)
    assert torch.allclose(out.view(rows, width, heads, v_dim).double(), expected, atol=1e-4)
