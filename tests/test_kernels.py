"""The compiled CPU kernels against PyTorch's products and attention, and where they hand over to PyTorch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from tp_infer.backends import reference
from tp_infer.backends.cpu import CpuBackend
from tp_infer.config import ModelArgs
from tp_infer.model import kernels
from tp_infer.model.layers import Layer, TensorParallel
from tp_infer.model.moe import MoE

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler or no AVX2 here")


@pytest.fixture
def switched_on():
    yield
    kernels.set_enabled(True)


@pytest.fixture(autouse=True)
def two_threads():
    """The kernels share rows, blocks and experts among their threads: tested on two, whatever OMP_NUM_THREADS the
    run sets (tests/run.sh sets 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


# rows: single-row blocks of w up to 4, tiles of 6 (AVX-512) or 4 rows past it; n and k: partial blocks, k's tail
SHAPES = [(64, 32), (33, 77), (5, 8), (130, 3), (7, 1024)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 23, 24, 47, 64])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_small_matmul_matches_linear(rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
    assert close_to_float64(kernels.linear(x, w), x, w)


def close_to_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether y is x w^T to fp32 rounding over the k products of each sum."""
    return torch.allclose(y.double(), F.linear(x.double(), w.double()), atol=1e-6 * x.shape[1], rtol=1e-5)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_small_matmul_gives_a_row_the_same_bits_in_any_batch(n, k):
    """A row's product is summed in one order whatever rows share the call (decode rows batched or alone)."""
    generator = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(kernels.MAX_ROWS, k, generator=generator), torch.randn(n, k, generator=generator)
    whole = kernels.linear(x, w)
    for rows in (1, 4, 5, 13, 40):
        assert torch.equal(kernels.linear(x[-rows:], w), whole[-rows:]), rows


def test_the_avx2_build_matches_linear(tmp_path, monkeypatch):
    """Where PyTorch finds no AVX-512 the kernels are built without it (tiles 8 floats wide); checked here on any
    AVX2 machine by telling the build so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "-mavx512f" not in kernels.flags()
    kernels.library.cache_clear()
    try:
        generator = torch.Generator().manual_seed(7)
        for rows, (n, k) in itertools.product([1, 3, 4, 5, 9, 24], SHAPES):
            x, w = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
            assert close_to_float64(kernels.linear(x, w), x, w), (rows, n, k)
        queries, keys, values = (torch.randn(13, 8, 16),), (torch.randn(40, 8, 16),), torch.randn(40, 8, 24)
        out = torch.empty(13, 8, 24)
        assert not kernels.extend_attention(queries, keys, values, out, 0.3)  # 24 is not a multiple of 16
        values, out = values[..., :16], out[..., :16]
        assert kernels.extend_attention(queries, keys, values, out, 0.3)
        assert torch.allclose(out.double(), attention_float64(queries, keys, values, 1, 0.3), atol=1e-5)
        x, w1, w3, w2 = torch.randn(13, 20), torch.randn(33, 20), torch.randn(33, 20), torch.randn(20, 33)
        expected = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        assert (kernels.swiglu(x, w1, w3, w2) - expected).abs().max() <= 1e-6 * expected.abs().max()
    finally:
        kernels.library.cache_clear()


def test_linear_hands_over_to_pytorch(switched_on):
    w = torch.randn(16, 32)
    x = torch.randn(kernels.MAX_ROWS + 1, 32)
    assert torch.allclose(kernels.linear(x, w), F.linear(x, w), atol=1e-5)  # more rows than the kernel takes
    assert torch.equal(kernels.linear(x[:2].bfloat16(), w.bfloat16()), F.linear(x[:2].bfloat16(), w.bfloat16()))
    strided = torch.randn(16, 64)[:, ::2]
    assert torch.equal(kernels.linear(x[:2], strided), F.linear(x[:2], strided))
    kernels.set_enabled(False)
    assert torch.equal(kernels.linear(x[:2], w), F.linear(x[:2], w))


def test_linear_takes_strided_rows():
    x, w = torch.randn(4, 64)[:, ::2], torch.randn(8, 32)
    assert torch.allclose(kernels.linear(x, w), F.linear(x, w), atol=1e-5)


def attention_float64(queries, keys, values, heads_per_kv: int, scale: float) -> torch.Tensor:
    """Causal attention of the last T of S positions in float64: queries (q1, q2?) [T, H, *], keys (k1, k2?)
    [S, G, *], values [S, G, Dv]; head h reads kv head h // heads_per_kv."""
    T, S = queries[0].shape[0], keys[0].shape[0]
    scores = sum(
        torch.einsum("thd,shd->hts", q.double(), k.double().repeat_interleave(heads_per_kv, 1))
        for q, k in zip(queries, keys, strict=True)
    )
    hidden = torch.arange(S) > (torch.arange(T) + S - T)[:, None]
    probs = (scores * scale).masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("hts,shv->thv", probs, values.double().repeat_interleave(heads_per_kv, 1))


# (T new tokens, S positions, H heads, G kv heads, dims of the key's parts, Dv): naive MLA (G = H) in one tile and in
# several, a lone token, a prefill (S = T); absorbed MLA (G = 1, keys latent + rope key, values the latent); grouped
EXTEND_CASES = [
    (7, 40, 4, 4, (32,), 16),
    (61, 130, 3, 3, (48,), 32),
    (1, 75, 2, 2, (16,), 16),
    (50, 50, 2, 2, (32,), 80),
    (13, 100, 8, 1, (64, 16), 64),
    (9, 33, 4, 2, (16, 16), 32),
]


@pytest.mark.parametrize(("T", "S", "H", "G", "dims", "v_dim"), EXTEND_CASES)
def test_extend_attention_matches_float64(T, S, H, G, dims, v_dim):
    generator = torch.Generator().manual_seed(T * S + H)
    # strided as the model passes them: a row of a wider stream, the heads of a wider cache entry
    queries = tuple(torch.randn(T, H, d + 3, generator=generator)[..., 3:] for d in dims)
    keys = tuple(torch.randn(S, G + 1, d, generator=generator)[:, 1:] for d in dims)
    values = torch.randn(S, G, v_dim + 16, generator=generator)[..., :v_dim]
    out = torch.full((T, H, v_dim), float("nan"))
    assert kernels.extend_attention(queries, keys, values, out, 0.3)
    assert torch.allclose(out.double(), attention_float64(queries, keys, values, H // G, 0.3), atol=1e-5)


def test_extend_attention_gives_the_same_bits_however_rows_are_blocked():
    """The blocks of query rows depend on the thread count (so that the threads share them evenly), but each row's
    scores, softmax and sum over the values run in the same order in any block."""
    generator = torch.Generator().manual_seed(5)
    queries = (torch.randn(40, 8, 32, generator=generator), torch.randn(40, 8, 16, generator=generator))
    keys = (torch.randn(90, 1, 32, generator=generator), torch.randn(90, 1, 16, generator=generator))
    values = torch.randn(90, 1, 32, generator=generator)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):  # 320 rows: 4 blocks of 80 on 1 and 2 threads, 6 of 54 on 3
            torch.set_num_threads(n)
            outs.append(torch.empty(40, 8, 32))
            assert kernels.extend_attention(queries, keys, values, outs[-1], 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.allclose(outs[0].double(), attention_float64(queries, keys, values, 8, 0.3), atol=1e-5)


def test_extend_attention_refuses_what_it_does_not_cover(switched_on):
    q, k, v, out = torch.randn(4, 2, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16), torch.empty(4, 2, 16)
    assert not kernels.extend_attention((q[..., :8],), (k[..., :8],), v, out, 1.0)  # not a multiple of 16
    assert not kernels.extend_attention((q.bfloat16(),), (k,), v, out, 1.0)
    assert not kernels.extend_attention((q,), (k[:3],), v[:3], out, 1.0)  # fewer positions than new tokens
    assert not kernels.extend_attention((q, q), (k,), v, out, 1.0)  # a query part without its keys
    kernels.set_enabled(False)
    assert not kernels.extend_attention((q,), (k,), v, out, 1.0)


@pytest.mark.parametrize("rows", [1, 5, 13, 24])
@pytest.mark.parametrize(("inter", "dim"), [(32, 64), (33, 20), (7, 9)])
def test_swiglu_matches_pytorch(rows, inter, dim):
    generator = torch.Generator().manual_seed(rows * 100 + inter + dim)
    x, w1, w3 = torch.randn(rows, dim, generator=generator), *torch.randn(2, inter, dim, generator=generator)
    w2 = torch.randn(dim, inter, generator=generator)
    for scale in (1, 1000):  # then silu far out on both sides: e^-a overflows for a << 0, vanishes for a >> 0
        expected = F.linear(F.silu(F.linear(x, w1 * scale)) * F.linear(x, w3), w2)
        error = (kernels.swiglu(x, w1 * scale, w3, w2) - expected).abs().max()
        assert error <= 1e-6 * expected.abs().max(), (scale, error)


@pytest.mark.parametrize("rows", [1, 3, 24])
@pytest.mark.parametrize("n", [512, 20, 7])
def test_rms_norm_matches_pytorch_on_strided_rows(rows, n):
    generator = torch.Generator().manual_seed(rows + n)
    x, weight = torch.randn(rows, n + 5, generator=generator)[:, :n], torch.randn(n, generator=generator)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-6), F.rms_norm(x, (n,), weight, 1e-6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 64), (5, 3, 10), (24, 64), (2, 6)])
def test_rope_matches_the_complex_product(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape[:-1], shape[-1] + 4, generator=generator)[..., 4:]  # strided, as q's rope part is
    rotations = torch.polar(
        torch.rand(shape[0], shape[-1] // 2, generator=generator) + 0.5,
        torch.randn(shape[0], shape[-1] // 2, generator=generator),
    )
    assert torch.allclose(kernels.rope(x, rotations), rotated(x, rotations), atol=1e-6, rtol=1e-5)


def rotated(x, rotations):
    """x [N, H, D] or [N, D] rotated by rotations [N, D / 2] through PyTorch's complex product."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * (rotations[:, None] if x.dim() == 3 else rotations)).flatten(-2)


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
    "rules",
    [
        dict(score_func="sigmoid"),
        dict(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2),
        dict(score_func="softmax", n_expert_groups=4, n_limited_groups=2),
        dict(score_func="softmax", route_norm=True, n_shared_experts=0),
    ],
)
@pytest.mark.parametrize("rows", [1, 3, 24, kernels.MAX_ROWS])  # the last: a short extend's tokens
def test_route_and_experts_match_pytorch(switched_on, rules, rows, monkeypatch):
    sizes = dict(dim=48, moe_inter_dim=24, n_routed_experts=16, n_activated_experts=3, n_shared_experts=1)
    args = ModelArgs(**(sizes | rules))
    torch.manual_seed(rows)
    moe = MoE(args, TensorParallel(), torch.float32)
    for parameter in moe.parameters():
        parameter.normal_(0, 0.3)
    x = torch.randn(rows, args.dim)
    returned, compiled = [], kernels.moe
    monkeypatch.setattr(kernels, "moe", lambda *operands: returned.append(compiled(*operands)) or returned[-1])
    use(moe, CpuBackend())
    (weights, indices), y = moe.gate(x), moe(x)
    assert len(returned) == 1 and returned[0] is not None
    moe(torch.randn(rows + 100, args.dim))  # past MAX_ROWS: not offered to the kernel
    assert len(returned) == 1
    use(moe, reference())
    (expected_weights, expected_indices), expected = moe.gate(x), moe(x)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(weights, expected_weights, atol=1e-6, rtol=1e-5)
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_experts_of_one_rank_match_pytorch(switched_on):
    """A rank holding experts 8-15 of 16: the kernel adds only those, as the PyTorch path does before the
    all-reduce."""
    args = ModelArgs(dim=32, moe_inter_dim=16, n_routed_experts=16, n_activated_experts=4, n_shared_experts=1)
    moe = MoE(args, TensorParallel(rank=1, world_size=2), torch.float32)
    for parameter in moe.parameters():
        parameter.normal_(0, 0.3)
    x = torch.randn(5, args.dim)
    weights, indices = moe.gate(x)
    y = CpuBackend().experts(x, weights, indices, moe.experts, moe.shared_experts)
    kernels.set_enabled(False)
    expected = moe.shared_experts(x)
    for token, choice in itertools.product(range(5), range(4)):
        expert = indices[token, choice].item()
        if expert >= 8:
            w1, w3, w2 = (w for w, _ in moe.experts.of(expert - 8))
            row = x[token]
            expected[token] += w2 @ (F.silu(w1 @ row) * (w3 @ row)) * weights[token, choice]
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)


def use(module: torch.nn.Module, backend) -> None:
    for m in module.modules():
        if isinstance(m, Layer):
            m.backend = backend


def test_moe_passes_over_experts_no_token_chose():
    """Experts given with no token routed to them add nothing, and the threads stay in step past them (they once
    raced: one thread read the next expert's token count and waited at a barrier the other never reached)."""
    generator = torch.Generator().manual_seed(3)
    experts = {
        e: tuple(torch.randn(*shape, generator=generator) for shape in ((8, 16), (8, 16), (16, 8))) for e in range(6)
    }
    x, weights = torch.randn(2, 16, generator=generator), torch.rand(2, 1, generator=generator)
    indices = torch.tensor([[4], [1]])
    chosen = kernels.moe(x, weights, indices, {e: experts[e] for e in (1, 4)}, None)
    for _ in range(200):  # experts 0, 2, 3 and 5 have no tokens
        assert torch.equal(kernels.moe(x, weights, indices, experts, None), chosen)


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


def decode_inputs(heads=4, nope=8, v_dim=8, latent_dim=32, rope_dim=8, num_blocks=12, block_size=4):
    generator = torch.Generator().manual_seed(7)
    latent = torch.randn(num_blocks, block_size, latent_dim, generator=generator)
    pe = torch.randn(num_blocks, block_size, rope_dim, generator=generator)
    wkv_b = torch.randn(heads, nope + v_dim, latent_dim, generator=generator) * 0.2
    q = torch.randn(4, heads, nope + rope_dim, generator=generator)
    return q.split([nope, rope_dim], dim=-1), wkv_b, latent, pe


def test_mla_decode_gives_the_same_bits_however_rows_are_shared_out():
    """Rows split between threads (fewer rows than threads), whole rows per thread, or each row alone: each output
    value is computed the same way, so the step's batch does not change its rows' results."""
    (q_nope, q_pe), wkv_b, latent, pe = decode_inputs()
    block_table, lengths = torch.tensor([[7, 2, 9], [3, 4, 5], [1, 0, 0], [8, 2, 10]]), torch.tensor([10, 12, 1, 9])
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 8):  # 4 rows on 1 thread: whole rows; on 8: each row split
            torch.set_num_threads(n)
            outs.append(kernels.mla_decode(q_nope, q_pe, wkv_b, latent, pe, block_table, lengths, 0.3))
        torch.set_num_threads(2)
        alone = [
            kernels.mla_decode(
                q_nope[r : r + 1], q_pe[r : r + 1], wkv_b, latent, pe, block_table[r : r + 1], lengths[r : r + 1], 0.3
            )
            for r in range(4)
        ]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], torch.cat(alone))


def test_mla_decode_stores_the_new_entries_first():
    (q_nope, q_pe), wkv_b, latent, pe = decode_inputs()
    latent_dim, rope_dim, block_size = latent.shape[-1], pe.shape[-1], latent.shape[1]
    block_table, lengths = torch.tensor([[7, 2, 9], [3, 4, 5], [1, 0, 0], [8, 6, 10]]), torch.tensor([10, 12, 1, 9])
    positions = lengths - 1
    slots = block_table.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    kv = torch.randn(4, latent_dim + rope_dim)
    norm_weight, rotations = (
        torch.rand(latent_dim) + 0.5,
        torch.polar(torch.ones(4, rope_dim // 2), torch.randn(4, rope_dim // 2)),
    )
    pools = latent.clone(), pe.clone()
    new = kernels.NewEntries(kv, norm_weight, 1e-6, rotations, slots)
    out = kernels.mla_decode(q_nope, q_pe, wkv_b, *pools, block_table, lengths, 0.3, new)

    latent.view(-1, latent_dim)[slots] = F.rms_norm(kv[:, :latent_dim], (latent_dim,), norm_weight, 1e-6)
    pe.view(-1, rope_dim)[slots] = rotated(kv[:, latent_dim:], rotations)
    assert torch.allclose(pools[0], latent, atol=1e-6) and torch.allclose(pools[1], pe, atol=1e-6)
    expected = reference_decode(q_nope, rotated(q_pe, rotations), wkv_b, latent, pe, block_table, lengths, 0.3)
    assert out is not None and torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("heads", "nope", "rope_dim", "v_dim"), [(8, 16, 8, 16), (3, 13, 4, 8), (5, 128, 64, 72)])
@pytest.mark.parametrize("threads", [1, 2, 8])
def test_mha_decode_matches_gathered_attention(heads, nope, rope_dim, v_dim, threads):
    generator = torch.Generator().manual_seed(heads * nope + v_dim)
    num_blocks, block_size = 12, 4
    keys = torch.randn(num_blocks, block_size, heads, nope + rope_dim, generator=generator)
    values = torch.randn(num_blocks, block_size, heads, v_dim, generator=generator)
    block_table = torch.tensor([[7, 2, 9, 0, 0], [3, 4, 5, 6, 11], [1, 0, 0, 0, 0], [8, 2, 10, 1, 0]])
    lengths = torch.tensor([10, 5 * block_size, 1, 13])
    q = torch.randn(4, heads, nope + rope_dim, generator=generator)
    q_nope, q_pe = q.split([nope, rope_dim], dim=-1)  # strided views, as the model passes them
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # 1, 2: whole rows per thread; 8: each row's heads shared out
        out = kernels.mha_decode(q_nope, q_pe, None, keys, values, block_table, lengths, 0.3)
        rows = [(q_nope[r : r + 1], q_pe[r : r + 1], None, keys, values, block_table[r : r + 1]) for r in range(4)]
        alone = [kernels.mha_decode(*row, lengths[r : r + 1], 0.3) for r, row in enumerate(rows)]
    finally:
        torch.set_num_threads(saved)
    assert out is not None and torch.equal(out, torch.cat(alone))
    assert torch.allclose(out, reference_mha(q, keys, values, block_table, lengths, 0.3), atol=1e-5, rtol=1e-4)


def reference_mha(q, keys, values, block_table, lengths, scale):
    """Each row's attention in float64 over its blocks, gathered and cut at its length."""
    outs = []
    for r, length in enumerate(lengths.tolist()):
        k = keys[block_table[r]].flatten(0, 1)[:length].double()
        v = values[block_table[r]].flatten(0, 1)[:length].double()
        probs = (torch.einsum("hd,shd->hs", q[r].double(), k) * scale).softmax(-1)
        outs.append(torch.einsum("hs,shv->hv", probs, v))
    return torch.stack(outs).float()


def test_mha_decode_stores_the_new_entries_first():
    heads, nope, rope_dim, v_dim, latent_dim, block_size = 3, 8, 8, 16, 32, 4
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(12, block_size, heads, nope + rope_dim, generator=generator)
    values = torch.randn(12, block_size, heads, v_dim, generator=generator)
    wkv_b = torch.randn(heads, nope + v_dim, latent_dim, generator=generator) * 0.2
    block_table, lengths = torch.tensor([[7, 2, 9], [3, 4, 5], [1, 0, 0], [8, 6, 10]]), torch.tensor([10, 12, 1, 9])
    positions = lengths - 1
    slots = block_table.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    kv, q = torch.randn(4, latent_dim + rope_dim), torch.randn(4, heads, nope + rope_dim)
    norm_weight, rotations = (
        torch.rand(latent_dim) + 0.5,
        torch.polar(torch.ones(4, rope_dim // 2), torch.randn(4, rope_dim // 2)),
    )
    pools = keys.clone(), values.clone()
    new = kernels.NewEntries(kv, norm_weight, 1e-6, rotations, slots)
    out = kernels.mha_decode(q[..., :nope], q[..., nope:], wkv_b, *pools, block_table, lengths, 0.3, new)

    latent = F.rms_norm(kv[:, :latent_dim], (latent_dim,), norm_weight, 1e-6)
    k_nope, v = torch.einsum("nc,hdc->nhd", latent, wkv_b).split([nope, v_dim], dim=-1)
    k_pe = rotated(kv[:, latent_dim:], rotations).unsqueeze(1).expand(-1, heads, -1)
    keys.view(-1, heads, nope + rope_dim)[slots] = torch.cat([k_nope, k_pe], dim=-1)
    values.view(-1, heads, v_dim)[slots] = v
    assert torch.allclose(pools[0], keys, atol=1e-5) and torch.allclose(pools[1], values, atol=1e-5)
    query = torch.cat([q[..., :nope], rotated(q[..., nope:], rotations)], dim=-1)
    expected = reference_mha(query, keys, values, block_table, lengths, 0.3)
    assert out is not None and torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_mha_decode_refuses_what_it_does_not_cover(switched_on):
    q_nope, q_pe, table, lengths = torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.tensor([[0, 1]]), torch.tensor([5])
    keys, values = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    assert kernels.mha_decode(q_nope, q_pe, None, keys, values[..., :6].contiguous(), table, lengths, 1.0) is None
    assert kernels.mha_decode(q_nope.bfloat16(), q_pe, None, keys, values, table, lengths, 1.0) is None
    kernels.set_enabled(False)
    assert kernels.mha_decode(q_nope, q_pe, None, keys, values, table, lengths, 1.0) is None
    kernels.set_enabled(True)
    assert kernels.mha_decode(q_nope, q_pe, None, keys, values, table, lengths, 1.0) is not None
    with pytest.raises(AssertionError, match="lengths"):
        kernels.mha_decode(q_nope, q_pe, None, keys, values, table, torch.tensor([9]), 1.0)


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


def test_library_is_loaded_only_from_a_private_folder_and_file(tmp_path, monkeypatch):
    """The built library is code the process runs: a cache folder others can write, or a library that is a link,
    is refused with one warning naming it, and PyTorch does the work."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "tp_infer"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"not loaded: folder .*tp_infer is writable by its group and others"):
            assert kernels.library() is None
        kernels.library.cache_clear()
        folder.chmod(0o700)
        assert kernels.library() is not None
        (built,) = folder.iterdir()
        elsewhere = tmp_path / "planted.so"
        built.rename(elsewhere)
        built.symlink_to(elsewhere)
        kernels.library.cache_clear()
        with pytest.warns(UserWarning, match="is a symbolic link: not followed"):
            assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
