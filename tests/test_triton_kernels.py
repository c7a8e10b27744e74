"""The cuda backend's Triton kernels against independent oracles and the torch backend: paged MLA decode (absorb and
naive form) over blocks scattered in the pool, in fp32, fp16 and FP8 caches, histories split into pieces or not;
block-FP8 products of ragged shapes; and whole steps of the tiny model through the cuda backend. Without a GPU every
kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before Triton is imported); with
one (scripts/cuda_check.sh) the same tests compile them for real."""

import os
import re

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from test_backends import BLOCK, STEPS, CountDequantisations, plan, pool_for, tiny  # noqa: E402

from tp_infer.backends import pick, reference  # noqa: E402
from tp_infer.backends import triton_kernels as tk  # noqa: E402
from tp_infer.backends.cuda import CudaBackend, score_keys, scores_of  # noqa: E402
from tp_infer.engine.runner import build_batch  # noqa: E402
from tp_infer.kv.pool import CacheTensor, LayerCache  # noqa: E402
from tp_infer.model import fp8  # noqa: E402
from tp_infer.model.batch import AttentionGroup  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
NUM_BLOCKS, BLOCK_SIZE = 128, 16
HISTORIES = [1, 15, 16, 17, 300]  # one token, around a block's edge, and several hundred
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def scattered_tables(rows: int, blocks_per_row: int, seed: int) -> torch.Tensor:
    """Each row's blocks all different, scattered over the pool and out of order."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))
    return order[: rows * blocks_per_row].view(rows, blocks_per_row).to(DEVICE)


def filled(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> CacheTensor:
    """A cache quantity of the pool's layout with random entries in every slot (FP8: quantised per token, as the pool
    stores them)."""
    tensor = CacheTensor(NUM_BLOCKS, BLOCK_SIZE, shape, dtype, DEVICE)
    values = torch.randn(NUM_BLOCKS * BLOCK_SIZE, *shape, generator=torch.Generator().manual_seed(seed))
    tensor.write(torch.arange(NUM_BLOCKS * BLOCK_SIZE, device=DEVICE), values.to(DEVICE))
    return tensor


def history(tensor: CacheTensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """One row's first `length` cached entries in float64, dequantised: the oracle's keys."""
    return tensor.read(table[None], torch.float64)[0, :length]


def attention_oracle(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(scores [..., S]) times values [..., S, D] in float64."""
    return scores.softmax(-1) @ values


def lengths_for(histories: list[int]) -> torch.Tensor:
    return torch.tensor(histories, device=DEVICE)


# decode rows: one row of each history, and all of them in one launch
ROW_SETS = [[h] for h in HISTORIES] + [HISTORIES]


@pytest.mark.parametrize("histories", ROW_SETS, ids=lambda h: "-".join(map(str, h)))
@pytest.mark.parametrize("cache", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("split_tokens", [None, 64], ids=["one-piece", "pieces-of-64"])
def test_absorbed_decode_matches_softmax_over_the_gathered_history(histories, cache, split_tokens):
    """mla_decode over latents [C] and rope keys [P] read through scattered block tables: each head's softmax over
    its row's first `length` positions of (q_latent . latent + q_pe . rope) * scale, times the latents, in float64
    (the dequantised cache as keys). Split into pieces of 64 tokens, the combine joins up to five pieces per row."""
    heads, latent_dim, rope_dim, scale = 20, 64, 16, 0.125  # 20 heads: two head groups, the second part-filled
    rows = len(histories)
    latent = filled((latent_dim,), CACHE_DTYPES[cache], seed=1)
    rope = filled((rope_dim,), CACHE_DTYPES[cache], seed=2)
    table = scattered_tables(rows, -(-max(histories) // BLOCK_SIZE) + 1, seed=rows + max(histories))
    generator = torch.Generator().manual_seed(3)
    q_latent = torch.randn(rows, heads, latent_dim, generator=generator).to(DEVICE)
    q_pe = torch.randn(rows, heads, rope_dim, generator=generator).to(DEVICE)
    got = tk.mla_decode(
        q_latent, q_pe, latent.data, latent.scale, rope.data, rope.scale, table, lengths_for(histories), scale,
        split_tokens=split_tokens,
    )  # fmt: skip
    assert got.shape == (rows, heads, latent_dim) and got.dtype == torch.float32
    for r, length in enumerate(histories):
        keys, rope_keys = history(latent, table[r], length), history(rope, table[r], length)
        scores = (q_latent[r].double() @ keys.T + q_pe[r].double() @ rope_keys.T) * scale
        expected = attention_oracle(scores, keys)
        assert torch.allclose(got[r].double(), expected, atol=1e-5, rtol=1e-5), (r, length)


def test_absorbed_decode_joins_more_pieces_than_the_combine_takes_at_once():
    """Pieces of 16 tokens: the 300-token row's history in 19 pieces (of the table's 20), more than the
    combine's COMBINE_BLOCK_S at a time, joined in several passes."""
    assert tk.COMBINE_BLOCK_S < -(-300 // 16)
    test_absorbed_decode_matches_softmax_over_the_gathered_history(HISTORIES, "fp8", 16)


@pytest.mark.parametrize("histories", [[1], [17], HISTORIES], ids=lambda h: "-".join(map(str, h)))
@pytest.mark.parametrize("cache", ["fp32", "fp8"])
@pytest.mark.parametrize("split_tokens", [None, 64], ids=["one-piece", "pieces-of-64"])
def test_per_head_decode_matches_softmax_over_the_gathered_history(histories, cache, split_tokens):
    """mha_decode over per-head keys [H, D] and values [H, V] (scales per token and head when FP8): each head's
    softmax over its own keys, times its own values, in float64."""
    heads, key_dim, value_dim, scale = 3, 48, 32, 0.125
    rows = len(histories)
    keys = filled((heads, key_dim), CACHE_DTYPES[cache], seed=4)
    values = filled((heads, value_dim), CACHE_DTYPES[cache], seed=5)
    table = scattered_tables(rows, -(-max(histories) // BLOCK_SIZE) + 1, seed=7 * rows + max(histories))
    q = torch.randn(rows, heads, key_dim, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    got = tk.mha_decode(
        q, keys.data, keys.scale, values.data, values.scale, table, lengths_for(histories), scale,
        split_tokens=split_tokens,
    )  # fmt: skip
    assert got.shape == (rows, heads, value_dim)
    for r, length in enumerate(histories):
        k, v = history(keys, table[r], length).transpose(0, 1), history(values, table[r], length).transpose(0, 1)
        scores = (q[r].double()[:, None] @ k.mT)[:, 0] * scale  # [H, S]
        expected = (scores.softmax(-1)[:, None] @ v)[:, 0]
        assert torch.allclose(got[r].double(), expected, atol=1e-5, rtol=1e-5), (r, length)


def test_a_row_whose_history_ends_before_a_piece_leaves_that_piece_empty():
    """Pieces past a row's length hold nothing (log-sum-exp -inf, weight 0 in the combine): a one-token row beside a
    300-token row in pieces of 32 gives that token's latent exactly (softmax over one position)."""
    latent, rope = filled((32,), torch.float32, seed=8), filled((16,), torch.float32, seed=9)
    table = scattered_tables(2, 20, seed=10)
    q_latent, q_pe = torch.randn(2, 4, 32, device=DEVICE), torch.randn(2, 4, 16, device=DEVICE)
    got = tk.mla_decode(
        q_latent, q_pe, latent.data, None, rope.data, None, table, lengths_for([1, 300]), 0.1, split_tokens=32
    )
    first = latent.data[table[0, 0], 0]
    assert torch.allclose(got[0], first.expand(4, -1), atol=1e-6)
    assert torch.isfinite(got).all()


def selections(histories: list[int], topk: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V3.2's sparse decode operands for rows of these histories: each row's topk positions (all it sees while fewer)
    drawn at random from its history (scattered over its blocks, in no order), and how many it selected; the
    slots past a row's count hold other positions of its history, which the kernel must not read."""
    generator = torch.Generator().manual_seed(seed)
    selected = torch.empty(len(histories), topk, dtype=dtype)
    for r, length in enumerate(histories):
        count = min(length, topk)
        selected[r, :count] = torch.randperm(length, generator=generator)[:count].to(dtype)
        selected[r, count:] = torch.randint(0, length, (topk - count,), generator=generator).to(dtype)
    return selected.to(DEVICE), lengths_for([min(length, topk) for length in histories])


SPARSE_HISTORIES = [1, 8, 17, 300]  # a selection of one, of the row's whole history, of part of it


@pytest.mark.parametrize("cache", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize(
    ("topk", "split_tokens", "index_dtype"),
    [(8, None, torch.int32), (40, 16, torch.int64)],
    ids=["top-8-one-piece-int32", "top-40-pieces-of-16-int64"],
)
def test_sparse_absorbed_decode_matches_softmax_over_the_selected_positions(cache, topk, split_tokens, index_dtype):
    """mla_decode with `selected` (V3.2): each head's softmax over only its row's selected positions (read through
    scattered block tables where they lie), times their latents, in float64. Rows selecting 1 position, all 8 they
    see (count == topk), and topk of 17 and of 300; top 40 split into pieces of 16 selected positions (three pieces
    for the 300-token row, one part-filled piece and empty ones for the short rows)."""
    heads, latent_dim, rope_dim, scale = 20, 64, 16, 0.125
    rows = len(SPARSE_HISTORIES)
    latent = filled((latent_dim,), CACHE_DTYPES[cache], seed=21)
    rope = filled((rope_dim,), CACHE_DTYPES[cache], seed=22)
    table = scattered_tables(rows, 20, seed=23)
    selected, counts = selections(SPARSE_HISTORIES, topk, index_dtype, seed=24)
    generator = torch.Generator().manual_seed(25)
    q_latent = torch.randn(rows, heads, latent_dim, generator=generator).to(DEVICE)
    q_pe = torch.randn(rows, heads, rope_dim, generator=generator).to(DEVICE)
    got = tk.mla_decode(
        q_latent, q_pe, latent.data, latent.scale, rope.data, rope.scale, table, counts, scale,
        split_tokens=split_tokens, selected=selected,
    )  # fmt: skip
    assert got.shape == (rows, heads, latent_dim)
    for r, length in enumerate(SPARSE_HISTORIES):
        chosen = selected[r, : counts[r]].long()
        keys, rope_keys = history(latent, table[r], length)[chosen], history(rope, table[r], length)[chosen]
        scores = (q_latent[r].double() @ keys.T + q_pe[r].double() @ rope_keys.T) * scale
        expected = attention_oracle(scores, keys)
        assert torch.allclose(got[r].double(), expected, atol=1e-5, rtol=1e-5), (r, length)


@pytest.mark.parametrize("cache", ["fp32", "fp8"])
def test_sparse_per_head_decode_matches_softmax_over_the_selected_positions(cache):
    """mha_decode with `selected`: each head's softmax over its row's selected positions' own keys, times their
    values, in float64 (pieces of 4 selected positions)."""
    heads, key_dim, value_dim, scale, topk = 3, 48, 32, 0.125, 8
    rows = len(SPARSE_HISTORIES)
    keys = filled((heads, key_dim), CACHE_DTYPES[cache], seed=26)
    values = filled((heads, value_dim), CACHE_DTYPES[cache], seed=27)
    table = scattered_tables(rows, 20, seed=28)
    selected, counts = selections(SPARSE_HISTORIES, topk, torch.int64, seed=29)
    q = torch.randn(rows, heads, key_dim, generator=torch.Generator().manual_seed(30)).to(DEVICE)
    got = tk.mha_decode(
        q, keys.data, keys.scale, values.data, values.scale, table, counts, scale, split_tokens=4, selected=selected
    )
    for r, length in enumerate(SPARSE_HISTORIES):
        chosen = selected[r, : counts[r]].long()
        k = history(keys, table[r], length)[chosen].transpose(0, 1)
        v = history(values, table[r], length)[chosen].transpose(0, 1)
        expected = (((q[r].double()[:, None] @ k.mT)[:, 0] * scale).softmax(-1)[:, None] @ v)[:, 0]
        assert torch.allclose(got[r].double(), expected, atol=1e-5, rtol=1e-5), (r, length)


def index_operands(histories: list[int], cache: str, seed: int, tied: float = 0.0):
    """Indexer keys [32] in a pool, a scattered table of 20 blocks per row, and each row's queries [5 heads, 32] and
    signed per-head weights. tied: the share of positions whose keys score exactly 0 (queries positive, those keys
    negative: relu leaves nothing), the ties that occur in the real model."""
    heads, dim = 5, 32
    generator = torch.Generator().manual_seed(seed)
    keys = filled((dim,), CACHE_DTYPES[cache], seed=seed + 1)
    q = torch.randn(len(histories), heads, dim, generator=generator)
    if tied:
        q = q.abs()
        values = torch.randn(NUM_BLOCKS * BLOCK_SIZE, dim, generator=generator)
        zero = torch.rand(NUM_BLOCKS * BLOCK_SIZE, generator=generator) < tied
        values[zero] = -values[zero].abs()
        keys.write(torch.arange(NUM_BLOCKS * BLOCK_SIZE, device=DEVICE), values.to(DEVICE))
    table = scattered_tables(len(histories), 20, seed=seed + 2)
    weights = torch.randn(len(histories), heads, generator=generator).to(DEVICE)
    return keys, table, q.to(DEVICE), weights, lengths_for(histories)


@pytest.mark.parametrize("cache", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("split_tokens", [None, 64], ids=["one-piece", "pieces-of-64"])
def test_index_scores_match_the_indexers_scores(cache, split_tokens):
    """index_scores over indexer keys read in place through scattered tables: the scores its keys hold are
    Indexer.scores (fp32, over the keys as the torch backend reads them, dequantised; signed weights, so scores of
    both signs) at each row's first `length` positions, -inf past them (rows of 1, 17 and 300 positions of 320; 5
    heads, not a power of two); its keys are cuda.score_keys of those scores, bit for bit."""
    histories = [1, 17, 300]
    keys, table, q, weights, lengths = index_operands(histories, cache, seed=31)
    got = tk.index_scores(q, weights, keys.data, keys.scale, table, lengths, split_tokens=split_tokens)
    assert got.shape == (3, 20 * BLOCK_SIZE) and got.dtype == torch.int64
    scores = scores_of(got)
    assert torch.equal(score_keys(scores), got)
    model = tiny(DEVICE, index_topk=8, index_n_heads=5, index_head_dim=32)
    cached = keys.read(table, torch.float32)
    expected = model.layers[0].attn.indexer.scores(q[:, None], weights[:, None], cached)[:, 0]
    assert (expected[2, :300] < 0).any() and (expected[2, :300] > 0).any()
    for r, length in enumerate(histories):
        tolerance = 1e-5 * expected.abs().max().item()
        assert torch.allclose(scores[r, :length], expected[r, :length], atol=tolerance, rtol=0)
        assert (scores[r, length:] == float("-inf")).all()


def test_score_keys_rank_ties_as_the_torch_backends_stable_sort():
    """One topk over cuda.score_keys (what the selection on the device takes) against the torch backend's rule (a
    stable descending sort: equal scores go to the earlier position), on scores full of exact ties (integers -1 to
    2, some -0.0, which equals +0.0), -inf past each row's length, rows seeing fewer positions than topk and more:
    the same positions in the same order, for each row's first min(length, topk)."""
    generator = torch.Generator().manual_seed(32)
    lengths = [1, 5, 12, 64, 64]
    scores = torch.randint(-1, 3, (5, 64), generator=generator).float()
    scores[torch.rand(5, 64, generator=generator) < 0.2] = -0.0
    scores[3] = 7.0  # a row of one tie throughout
    scores = torch.where(torch.arange(64) < torch.tensor(lengths)[:, None], scores, float("-inf")).to(DEVICE)
    got = score_keys(scores).topk(8, dim=-1, sorted=True).indices
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[:, :8]
    for r, length in enumerate(lengths):
        count = min(length, 8)
        assert got[r, :count].tolist() == expected[r, :count].tolist(), r
    assert got[3].tolist() == list(range(8))
    assert torch.equal(scores_of(score_keys(scores)), torch.where(scores == 0, 0.0, scores))


@pytest.mark.parametrize("cache", ["fp32", "fp8"])
def test_the_sparse_selection_on_the_device_is_the_indexers(cache):
    """CudaBackend.selection (index_scores, then a topk of its keys) of decode rows where 90% of the keys score exactly
    0 (relu leaves nothing: the ties of the real model), so that a row's top 16 ends among tied positions: the
    positions Indexer.select keeps (the torch backend's selection, the earlier of equal scores), for rows seeing
    fewer positions than topk (all of them) and more."""
    from tp_infer.model.attention import IndexQueries

    histories, topk = [5, 40, 300], 16
    keys, table, q, weights, lengths = index_operands(histories, cache, seed=33, tied=0.9)
    model = tiny(DEVICE, index_topk=topk, index_n_heads=5, index_head_dim=32)
    mla = model.layers[0].attn
    cache_layer = LayerCache(NUM_BLOCKS, BLOCK_SIZE, [(8,), (8,), (32,)], CACHE_DTYPES[cache], DEVICE)
    cache_layer.tensors[mla.attended] = keys
    visible = torch.arange(20 * BLOCK_SIZE, device=DEVICE) < lengths[:, None, None]
    group = AttentionGroup(start=0, rows=3, width=1, block_table=table, visible=visible, lengths=lengths)
    index = IndexQueries(q=q, weights=weights, key=torch.empty(0))
    selected, counts = CudaBackend().selection(mla, cache_layer, group, index)
    expected = reference().selected(mla, cache_layer, group, index)[:, 0]
    assert counts.tolist() == [5, 16, 16]
    scores = scores_of(tk.index_scores(q, weights, keys.data, keys.scale, table, lengths))
    for r in range(3):
        mask = torch.zeros_like(expected[r])
        mask[selected[r, : counts[r]]] = True
        assert torch.equal(mask, expected[r]), r
    tied = (scores[1:, :40] == 0).sum(-1)
    assert (tied > 16).all() and ((scores[1:] > 0).sum(-1) < 16).any(), "a selection ends among exact ties"


@pytest.mark.parametrize(("m", "n", "k"), [(1, 256, 384), (5, 200, 300), (33, 576, 128), (3, 7, 5), (17, 130, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_fp8_linear_matches_the_dequantised_product(m, n, k, dtype):
    """x [M, K] times an FP8 weight [N, K] with 128x128 block scales: the dequantised weight's product (fp8.dequantize
    then F.linear, in fp32), for whole blocks, ragged N and K (wkv_a's 576 rows; K not a multiple of 128) and one
    row. fp16 activations come back in fp16, within its rounding."""
    generator = torch.Generator().manual_seed(m + n + k)
    weight, scale = fp8.quantize(torch.randn(n, k, generator=generator))
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight, scale, x = weight.to(DEVICE), scale.to(DEVICE), x.to(DEVICE)
    got = tk.fp8_linear(x, weight, scale)
    expected = torch.nn.functional.linear(x.float(), fp8.dequantize(weight, scale, torch.float32))
    assert got.shape == (m, n) and got.dtype == dtype
    tolerance = (1e-5 if dtype == torch.float32 else 2e-3) * expected.abs().max().item()
    assert torch.allclose(got.float(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activation_quantisation_matches_the_torch_one_in_scaled_mms_layout(rows, dtype):
    """quantize_rows (one launch) gives fp8.quantize_rows' e4m3 values bit for bit and its scales exactly, for
    blocks of very different magnitudes, an all-zero block, and a block whose largest value is 448 (scale 1: its
    values are rounded to e4m3 as they are, including those whose rounding carries into the exponent, 127.9 to 128,
    which Triton's interpreter alone gets wrong unpatched); the scales laid out column-major as F.scaled_mm's
    BlockWise1x128 recipe takes them (stride 1 down the rows, even for one row)."""
    generator = torch.Generator().manual_seed(rows)
    magnitudes = torch.tensor([1e-3, 1.0, 30.0, 0.0]).repeat_interleave(128)
    x = torch.randn(rows, 640, generator=generator)
    x[:, :512] *= magnitudes
    x[:, 512:520] = torch.tensor([448.0, 127.9, -239.9, 15.99, 0.0019, -0.99, 3.5, 1e-3])
    x = x.to(DEVICE, dtype)
    q, scale = tk.quantize_rows(x)
    expected_q, expected_scale = fp8.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(scale, expected_scale)
    assert q.float()[0, 513].item() == 128.0
    assert scale.stride() == (1, rows)


def test_the_quantised_activations_pass_torchs_checks_of_the_block_wise_recipe():
    """What quantize_rows writes, moved to the meta device with its strides, goes into reference.scaled_linear as
    given (quantized=...): torch's own checks of F.scaled_mm's block-wise layouts pass there without a GPU."""
    from tp_infer.backends.reference import scaled_linear

    x = torch.randn(1, 512).to(DEVICE, torch.float16)
    q, scale = tk.quantize_rows(x)
    meta = [t.to("meta") for t in (x.bfloat16(), q, scale)]
    assert meta[2].stride() == scale.stride()
    weight = torch.empty(384, 512, dtype=torch.float8_e4m3fn, device="meta")
    y = scaled_linear(meta[0], weight, torch.empty(3, 4, device="meta"), quantized=(meta[1], meta[2]))
    assert y.shape == (1, 384) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_the_torch_backend(dtype):
    """rms_norm (one launch, a program per row) on rows of 300 (not a power of two) taken from a wider tensor
    (strided rows, as kv_norm's latent is a slice of wkv_a's output), and on a [2, 3, 300] input: the torch
    backend's values within fp32's reduction order, rounded as it rounds (fp16: to fp16, then times the weight)."""
    generator = torch.Generator().manual_seed(2)
    wide = (torch.randn(7, 320, generator=generator) * 3).to(DEVICE, dtype)
    weight = torch.randn(300, generator=generator).to(DEVICE, dtype)
    for x in (wide[:, :300], wide[:6, :300].reshape(2, 3, 300)):
        got, expected = tk.rms_norm(x, weight, 1e-6), reference().rms_norm(x, weight, 1e-6)
        assert got.shape == x.shape and got.dtype == dtype
        tolerance = 1e-6 if dtype == torch.float32 else 2e-3
        assert torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_matches_apply_rope_and_rotates_a_view_in_place(dtype):
    """rope (one launch) on [N, H, D] and [N, D] against apply_rope, and into its own input where that is the rope
    part of each head's query (a strided view), leaving the rest of the query untouched."""
    from tp_infer.model.rope import apply_rope

    generator = torch.Generator().manual_seed(3)
    rotations = torch.randn(4, 32, 2, generator=generator).to(DEVICE)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    for x in (torch.randn(4, 20, 64, generator=generator), torch.randn(4, 64, generator=generator)):
        x = x.to(DEVICE, dtype)
        assert torch.allclose(tk.rope(x, rotations).float(), apply_rope(x, rotations).float(), atol=tolerance)
    q = torch.randn(4, 20, 96, generator=generator).to(DEVICE, dtype)
    expected = q.clone()
    expected[..., 32:] = apply_rope(expected[..., 32:], rotations)
    tk.rope(q[..., 32:], rotations, out=q[..., 32:])
    assert torch.equal(q[..., :32], expected[..., :32])
    assert torch.allclose(q.float(), expected.float(), atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_head_fp8_products_match_the_dequantised_heads(dtype):
    """fp8_heads over windows of one FP8 weight [H * (nope + v), C] (wkv_b's layout) that do not start on a 128-row
    block (nope 48, v 40): a query's nope part into latent space by each head's w_k (K along the rows), and latents
    back out by each head's w_v (K along the columns), as the dequantised weight's per-head products."""
    heads, nope, v, latent_dim, rows = 5, 48, 40, 200, 3
    generator = torch.Generator().manual_seed(13)
    weight, scale = fp8.quantize(torch.randn(heads * (nope + v), latent_dim, generator=generator))
    weight, scale = weight.to(DEVICE), scale.to(DEVICE)
    dense = fp8.dequantize(weight, scale, torch.float32).view(heads, nope + v, latent_dim)
    q_nope = torch.randn(rows, heads, nope, generator=generator).to(DEVICE, dtype)
    mixed = torch.randn(rows, heads, latent_dim, generator=generator).to(DEVICE, dtype)
    q_latent = tk.fp8_heads(q_nope, weight, scale, latent_dim, nope + v, 0, k_along_rows=True)
    out = tk.fp8_heads(mixed, weight, scale, v, nope + v, nope, k_along_rows=False)
    expected_latent = torch.einsum("rhd,hdc->rhc", q_nope.float(), dense[:, :nope])
    expected_out = torch.einsum("rhc,hjc->rhj", mixed.float(), dense[:, nope:])
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    for got, expected in ((q_latent, expected_latent), (out, expected_out)):
        assert got.dtype == dtype
        assert torch.allclose(got.float(), expected, atol=tolerance * expected.abs().max().item(), rtol=0)


def test_a_decode_step_through_the_cuda_backend_dequantises_nothing(monkeypatch):
    """With FP8 weights, one row's decode step through the cuda backend reads every FP8 weight in place: the
    products in the Triton product, the experts in the expert kernels, wkv_b in the per-head products around the
    paged decode; fp8.dequantize is never called (the torch backend calls it for every weight on the CPU)."""
    model = tiny(DEVICE, fp8_weights=True)
    model.use_backend(CudaBackend())
    pool = pool_for(model, DEVICE)
    for rows in ([(0, 0, list(range(2, 22)))], [(0, 20, [9])]):
        step = plan(rows)
        batch = build_batch(step, BLOCK, torch.device(DEVICE))
        if rows[0][1]:  # the decode step
            count = CountDequantisations(monkeypatch)
        model(step.tokens.to(DEVICE), batch, pool.layers)
    assert count.matrices == 0


def test_the_expert_schedule_gives_each_expert_with_pairs_its_tiles_and_spares_the_rest():
    """Pairs per expert [0, 3, 17, 0, 1] (bounds [0, 0, 3, 20, 20, 21]) in tiles of 16, as each expert kernel's
    program works out its own: expert 1's three pairs, expert 2's sixteen and one more, expert 4's one; experts
    without pairs get no tile, and the tiles a routing may need beyond (21 pairs / 16 + 5 experts = 7 in all) are
    spare (-1, empty)."""
    bounds = torch.tensor([0, 0, 3, 20, 20, 21], dtype=torch.int32, device=DEVICE)
    expert, start, end = (t.tolist() for t in tk.tile_schedule(bounds, 21, 16))
    assert expert == [1, 2, 2, 4, -1, -1, -1]
    assert start == [0, 3, 19, 20, 0, 0, 0]
    assert end == [3, 19, 20, 21, 0, 0, 0]


def fp8_experts_of(first: int, count: int, dim: int, inter: int, seed: int):
    """Experts [first, first + count) with random FP8 weights and block scales (as test_backends.tiny fills them)."""
    from tp_infer.model.moe import Experts

    generator = torch.Generator().manual_seed(seed)
    experts = Experts(first, count, dim, inter, torch.float32, fp8_weights=True)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            weight, scale = getattr(experts, name), getattr(experts, f"{name}_scale")
            weight.copy_(torch.randn(weight.shape, generator=generator).mul_(100).clamp_(-400, 400).to(weight.dtype))
            scale.copy_(torch.rand(scale.shape, generator=generator).add_(0.5) / 100 / weight.shape[-1] ** 0.5)
    return experts.to(DEVICE)


@pytest.mark.parametrize(
    ("tokens", "first", "count", "total", "dim", "inter", "dtype"),
    [
        (1, 0, 8, 8, 128, 64, torch.float32),
        (40, 0, 8, 8, 128, 64, torch.float32),
        (6, 4, 4, 8, 200, 96, torch.float32),
        (300, 0, 4, 4, 128, 64, torch.float16),
    ],
    ids=["one-token", "many-tokens", "rank-1-of-2-ragged", "fp16-tiles-of-64"],
)
def test_fp8_experts_match_the_torch_backend(tokens, first, count, total, dim, inter, dtype):
    """CudaBackend.experts with FP8 experts (the pairs sorted on the device, the Triton expert kernels, the routing
    weights applied inside): the torch backend's mixture. One token (most experts without pairs), many, a rank
    holding the second half of the experts (the other half's pairs left out) with ragged widths (dim 200, inter
    96: no multiple of 128), and enough fp16 pairs for tiles of 64 (fp32 keeps tiles of 16)."""
    experts = fp8_experts_of(first, count, dim, inter, seed=tokens)
    generator = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, dim, generator=generator).to(DEVICE, dtype)
    indices = torch.stack([torch.randperm(total, generator=generator)[:2] for _ in range(tokens)]).to(DEVICE)
    weights = torch.rand(tokens, 2, generator=generator).to(DEVICE, dtype)
    got = CudaBackend().experts(x, weights, indices, experts, None)
    expected = reference().experts(x, weights, indices, experts, None)
    assert got.dtype == dtype
    tolerance = (1e-5 if dtype == torch.float32 else 3e-3) * expected.abs().max().item()
    assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=0)
    if first:  # tokens whose choices are all the other rank's get nothing here
        others = ((indices < first) | (indices >= first + count)).all(dim=1)
        assert others.any() and (got[others] == 0).all()


def decode_layer(attn_impl: str, kv_cache_dtype: str):
    """The tiny model's first attention layer (fp32), a pool layer holding two rows' histories (17 and 300 tokens of
    random entries, scattered blocks), and one new query per row."""
    model = tiny(DEVICE, attn_impl=attn_impl, kv_cache_dtype=kv_cache_dtype)
    mla = model.layers[0].attn
    shapes = [(mla.kv_lora_rank,), (mla.rope_dim,)]
    if attn_impl == "naive":
        shapes = [(mla.local_heads, mla.nope_dim + mla.rope_dim), (mla.local_heads, mla.v_dim)]
    cache = LayerCache(NUM_BLOCKS, BLOCK_SIZE, shapes, CACHE_DTYPES.get(kv_cache_dtype, torch.float32), DEVICE)
    generator = torch.Generator().manual_seed(11)
    for tensor, shape in zip(cache.tensors, shapes, strict=True):
        entries = torch.randn(NUM_BLOCKS * BLOCK_SIZE, *shape, generator=generator).to(DEVICE)
        tensor.write(torch.arange(NUM_BLOCKS * BLOCK_SIZE, device=DEVICE), entries)
    lengths = lengths_for([17, 300])
    table = scattered_tables(2, 19, seed=12)
    visible = torch.arange(19 * BLOCK_SIZE, device=DEVICE) < lengths[:, None, None]
    group = AttentionGroup(start=1, rows=2, width=1, block_table=table, visible=visible, lengths=lengths)
    q = torch.randn(4, mla.local_heads, mla.nope_dim + mla.rope_dim, generator=generator).to(DEVICE)
    return mla, q, mla.wkv_b_heads(torch.float32), cache, group


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
@pytest.mark.parametrize("kv_cache_dtype", ["fp32", "fp8"])
def test_the_cuda_backend_attends_decode_rows_as_the_torch_backend(attn_impl, kv_cache_dtype):
    """CudaBackend.attend of a decode group (rows 1 and 2 of a stream of 4 tokens) over the pool in place: the torch
    backend's attention over the gathered blocks (same pool, same queries), to fp32 rounding."""
    mla, q, wkv_b, cache, group = decode_layer(attn_impl, kv_cache_dtype)
    got = CudaBackend().attend(mla, q, wkv_b, cache, group)
    expected = reference().attend(mla, q, wkv_b, cache, group)
    assert got.shape == expected.shape == (2, mla.local_heads, mla.v_dim)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def run_steps_on(model, backend) -> list[torch.Tensor]:
    """test_backends.run_steps on DEVICE: prefills, decode, an extend beside a decode row, decode."""
    model.use_backend(backend)
    pool = pool_for(model, DEVICE)
    out = []
    for rows in STEPS:
        step = plan(rows)
        batch = build_batch(step, BLOCK, torch.device(DEVICE))
        out.append(model(step.tokens.to(DEVICE), batch, pool.layers, all_logits=True))
    return out


@pytest.mark.parametrize(
    "options",
    [dict(attn_impl="absorb", fp8_weights=True, kv_cache_dtype="fp8"), dict(attn_impl="naive", fp8_weights=True)],
    ids=["absorb-fp8-weights-fp8-cache", "naive-fp8-weights"],
)
def test_the_cuda_backend_runs_the_tiny_model_as_the_torch_backend(options):
    """Prefill, decode, extend beside decode, and decode again through the cuda backend (every FP8 product in the
    Triton kernel, the routed experts in the expert kernels, decode attention in the paged kernels, the rest the
    reference's): the torch backend's logits."""
    model = tiny(DEVICE, **options)
    expected = run_steps_on(model, reference())
    got = run_steps_on(model, CudaBackend())
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item(), rtol=0), f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"


@pytest.mark.parametrize(
    "options",
    [
        dict(attn_impl="absorb", fp8_weights=True, kv_cache_dtype="fp8"),
        dict(attn_impl="absorb"),
        dict(attn_impl="naive", fp8_weights=True),
        dict(attn_impl="absorb", index_topk=64),
    ],
    ids=["absorb-fp8-weights-fp8-cache", "absorb-fp32", "naive-fp8-weights", "absorb-fp32-top-64-dense"],
)
def test_the_cuda_backend_runs_a_sparse_attention_model_as_the_torch_backend(monkeypatch, options):
    """A V3.2 model (the indexer keeping 8 of the 21 to 40 positions its decode rows see, its keys a third cached
    quantity): the cuda backend scores each decode group's rows over the cached indexer keys in the Triton kernel,
    selects their top 8 on the device and decodes over those in the paged kernel (once per layer in each of the
    three steps with decode rows); prefills and the extend go to the reference: the torch backend's logits and
    greedy tokens. Keeping 64, more than the rows' tables hold (48 positions), the indexer narrows nothing: the
    decode rows take the dense paged decode, with no scoring."""
    calls = []
    for name in ("index_scores", "mla_decode", "mha_decode"):
        original = getattr(tk, name)

        def spy(*a, _f=original, _n=name, **k):
            calls.append((_n, k.get("selected") is not None))
            return _f(*a, **k)

        monkeypatch.setattr(tk, name, spy)
    model = tiny(DEVICE, **(dict(index_topk=8, index_n_heads=4, index_head_dim=32) | options))
    expected = run_steps_on(model, reference())
    got = run_steps_on(model, CudaBackend())
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item(), rtol=0), f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"
    decode = "mla_decode" if options["attn_impl"] == "absorb" else "mha_decode"
    layers = model.args.n_layers
    narrowed = model.args.index_topk == 8
    assert calls.count(("index_scores", False)) == (3 * layers if narrowed else 0)
    assert calls.count((decode, narrowed)) == 3 * layers and (decode, not narrowed) not in calls


def test_the_kernels_are_offered_decode_groups_and_fp8_products_only(monkeypatch):
    """In a step of the tiny model the cuda backend sends each decode group to the paged kernel (one per layer per
    step with decode rows), each FP8 product to the Triton product and each MoE layer's routed experts to the
    expert kernels; prefill groups go to the reference."""
    calls = []
    for name in ("mla_decode", "fp8_linear", "fp8_experts"):
        original = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = tiny(DEVICE, attn_impl="absorb", fp8_weights=True)
    run_steps_on(model, CudaBackend())
    layers = model.args.n_layers
    assert calls.count("mla_decode") == 3 * layers  # the decode steps, and the decode row beside the extend
    assert calls.count("fp8_experts") == len(STEPS) * (layers - model.args.n_dense_layers)
    assert calls.count("fp8_linear") > 0


def test_auto_picks_the_cuda_backend_on_cuda_and_torch_forces_the_reference(monkeypatch):
    assert pick("auto", "cuda", "bf16").name == pick("auto", "cuda", "fp32").name == "cuda"
    assert pick("torch", "cuda", "bf16").name == "torch"
    assert pick("auto", "cpu", "bf16").name == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA, not on cpu"):
        pick("cuda", "cpu", "fp32")


@pytest.mark.parametrize("sparse", [False, True], ids=["v3", "v3.2"])
@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_around_its_kernels_the_cuda_backend_reads_nothing_back(monkeypatch, attn_impl, sparse):
    """The cuda backend's own ops (sorting the experts' pairs, the queries into latent space, the stores, the
    reference's paths it hands over to; V3.2's top-k selection) read no value back to the host: on the meta device,
    where any read raises, with its kernels replaced by shape-only stand-ins (step_counts' ModelledKernels), a decode
    step of 8 rows and a prefill of the tiny model run whole (bf16, FP8 weights and cache, as on a GPU; with V3.2's
    indexer keeping 8 positions, the decode rows' 71 narrowed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from step_counts import ModelledKernels, StepCounter, Tally

    from tp_infer.backends import cuda
    from tp_infer.engine.runner import StepPlan

    v32 = dict(index_topk=8, index_n_heads=4, index_head_dim=32) if sparse else {}
    model = tiny("meta", attn_impl=attn_impl, dtype="bf16", fp8_weights=True, kv_cache_dtype="fp8", **v32)
    tally = Tally()
    stand_ins = ModelledKernels(StepCounter(tally), history=71, args=model.args)
    monkeypatch.setattr(cuda, "triton_kernels", lambda: stand_ins)
    monkeypatch.setattr(cuda, "triton_router", lambda: stand_ins)
    model.use_backend(CudaBackend())
    pool = pool_for(model, "meta")
    tables = [[(r * 6 + i) % 48 for i in range(6)] for r in range(8)]
    decode = StepPlan.from_rows([(tables[r], 70 + r, [5]) for r in range(8)])
    prefill = StepPlan.from_rows([(tables[0][:3], 0, list(range(2, 42)))])
    for step in (decode, prefill):
        logits = model(step.tokens.to("meta"), build_batch(step, BLOCK, torch.device("meta")), pool.layers)
        assert logits.device.type == "meta" and logits.shape == (len(step.num_new), model.args.vocab_size)
    kernels = {"paged decode (modelled)", "Triton FP8 experts, down (modelled)", "Triton block-FP8 product (modelled)"}
    kernels |= {"Triton router (modelled)", "Triton RMSNorm (modelled)", "Triton rope (modelled)"}
    assert kernels | ({"index scores (modelled)"} if sparse else set()) <= set(tally.by_op), "the stand-ins stood in"


def test_the_byte_model_counts_paged_decode_as_one_read_of_each_rows_history():
    """scripts/step_counts.py's model of the cuda backend's decode kernel on meta, at V3's widths (16 local heads,
    latent 512, rope 64, bf16 cache): the queries, table and lengths, and each row's history of latents and rope
    keys once; the pieces' fp32 partial sums and log-sum-exps written, read back by the combine, and the output."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from step_counts import ModelledKernels, StepCounter, Tally

    rows, heads, history, blocks = 2, 16, 1000, 64
    meta = dict(device="meta", dtype=torch.bfloat16)
    q_latent, q_pe = torch.empty(rows, heads, 512, **meta), torch.empty(rows, heads, 64, **meta)
    latent, rope = torch.empty(300, 16, 512, **meta), torch.empty(300, 16, 64, **meta)
    table = torch.empty(rows, blocks, dtype=torch.long, device="meta")
    lengths = torch.empty(rows, dtype=torch.long, device="meta")
    tally = Tally()
    kernels = ModelledKernels(StepCounter(tally), history)
    out = kernels.mla_decode(q_latent, q_pe, latent, None, rope, None, table, lengths, 0.1)
    assert out.shape == (rows, heads, 512) and out.dtype == torch.bfloat16
    pieces = 4  # 2 rows x 1 head group fill no H100: as many pieces as 256-token ones fit the 1,024 table positions
    partial = rows * heads * pieces * 513 * 4
    queries = rows * heads * (512 + 64) * 2 + rows * blocks * 8 + rows * 8
    assert tally.read["other"] == queries + rows * history * (512 + 64) * 2 + partial
    assert tally.written["other"] == partial + rows * heads * 512 * 2


def test_the_byte_model_counts_sparse_decode_as_the_selected_entries_and_every_indexer_key():
    """step_counts' model of V3.2's decode on the cuda backend, at V3.2's widths (16 local heads, latent 512, rope
    64, indexer keys of 128, bf16): the index scores read each row's whole history of indexer keys once and write a
    score key (int64) per table position; the sparse decode reads the selected positions' latents and rope keys
    only (256 of the 1,000), and the selection itself."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from step_counts import ModelledKernels, StepCounter, Tally

    rows, heads, history, blocks, topk = 2, 16, 1000, 64, 256
    meta = dict(device="meta", dtype=torch.bfloat16)
    table = torch.empty(rows, blocks, dtype=torch.long, device="meta")
    lengths = torch.empty(rows, dtype=torch.long, device="meta")
    tally = Tally()
    kernels = ModelledKernels(StepCounter(tally), history)
    q, weights = torch.empty(rows, 64, 128, **meta), torch.empty(rows, 64, device="meta")
    keys = kernels.index_scores(q, weights, torch.empty(300, 16, 128, **meta), None, table, lengths)
    assert keys.shape == (rows, blocks * 16) and keys.dtype == torch.int64
    table_bytes = rows * blocks * 8 + rows * 8
    assert tally.read["other"] == rows * 64 * 128 * 2 + rows * 64 * 4 + table_bytes + rows * history * 128 * 2
    assert tally.written["other"] == rows * blocks * 16 * 8
    tally.read.clear()
    q_latent, q_pe = torch.empty(rows, heads, 512, **meta), torch.empty(rows, heads, 64, **meta)
    latent, rope = torch.empty(300, 16, 512, **meta), torch.empty(300, 16, 64, **meta)
    selected = torch.empty(rows, topk, dtype=torch.long, device="meta")
    kernels.mla_decode(q_latent, q_pe, latent, None, rope, None, table, lengths, 0.1, selected=selected)
    pieces = 1  # 2 rows x 1 head group over 256 selected positions: one piece (none shorter than 256)
    partial = rows * heads * pieces * 513 * 4
    queries = rows * heads * (512 + 64) * 2 + table_bytes + rows * topk * 8
    assert tally.read["other"] == queries + rows * topk * (512 + 64) * 2 + partial


def test_every_kernel_compiles_for_hopper_without_a_gpu():
    """scripts/compile_kernels.py compiles each kernel in the variants the backend launches for sm90 with Triton's
    own ptxas (no GPU needed), outside the interpreter: what it cannot catch (a type the compiler refuses, shared
    memory past an H100's) fails here."""
    import subprocess
    import sys
    from pathlib import Path

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_kernels.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^0 of \d+ variants failed for sm90$", run.stdout, re.MULTILINE), run.stdout
