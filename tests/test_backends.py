"""The backends against the torch reference on the same batches, and the reference's decode step: no host
synchronisation (it runs whole on the meta device, where reading a value back raises), at most one dequantisation
per FP8 weight it uses, and one graph under torch.compile(fullgraph=True)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from tp_infer.backends import pick, reference
from tp_infer.backends.cpu import CpuBackend
from tp_infer.config import load_config
from tp_infer.engine.runner import StepPlan, build_batch
from tp_infer.kv.pool import KVPool
from tp_infer.model import fp8, kernels
from tp_infer.model.attention import cache_layout
from tp_infer.model.transformer import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from step_counts import fill_random

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config_tiny.json"
BLOCK, BLOCKS = 16, 48
# each row's blocks, scattered over the pool and out of order
TABLES = [[7, 30, 2, 19, 41, 11], [44, 0, 23, 36, 5, 28]]


def tiny(device: str = "cpu", **options):
    """The tiny config's model with random weights (FP8 with block scales where fp8_weights), its torch backend."""
    args = load_config(CONFIG, max_seq_len=96, **({"dtype": "fp32"} | options))
    with torch.device(device):
        model = Transformer(args, backend=reference())
    if device == "meta":
        return model
    fill_random(model, 0)
    return model.eval()


def pool_for(model: Transformer, device: str = "cpu") -> KVPool:
    return KVPool.of(cache_layout(model.args, 1), BLOCKS, BLOCK, torch.device(device))


def plan(rows: list[tuple[int, int, list[int]]]) -> StepPlan:
    """rows of (row of TABLES, start position, new token ids)."""
    return StepPlan.from_rows(
        [(TABLES[r][: -(-(start + len(ids)) // BLOCK)], start, ids) for r, start, ids in rows], all_logits=True
    )


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# two prefills in one step (one ending inside a block), decode, an extend beside a decode row (mixed), decode
STEPS = [
    [(0, 0, tokens(20, 1)), (1, 0, tokens(37, 2))],
    [(0, 20, tokens(1, 3)), (1, 37, tokens(1, 4))],
    [(0, 21, tokens(9, 5)), (1, 38, tokens(1, 6))],
    [(0, 30, tokens(1, 7)), (1, 39, tokens(1, 8))],
]


def run_steps(model: Transformer, backend) -> list[torch.Tensor]:
    model.use_backend(backend)
    pool = pool_for(model)
    out = []
    for rows in STEPS:
        step = plan(rows)
        out.append(model(step.tokens, build_batch(step, BLOCK, torch.device("cpu")), pool.layers, all_logits=True))
    return out


CASES = [
    dict(attn_impl="absorb"),
    dict(attn_impl="naive"),
    dict(attn_impl="absorb", kv_cache_dtype="fp8"),
    dict(attn_impl="naive", kv_cache_dtype="fp8"),
    dict(attn_impl="absorb", fp8_weights=True),
    dict(attn_impl="naive", fp8_weights=True, kv_cache_dtype="fp8"),
    dict(attn_impl="absorb", dtype="bf16", fp8_weights=True),
    dict(attn_impl="naive", dtype="bf16", kv_cache_dtype="bf16"),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_cpu_backend_matches_the_torch_backend(options):
    """Prefill, decode, extend beside decode, and decode again: the same logits from both backends (the compiled
    kernels and oneDNN in fp32; the reference's paths wherever the cpu backend hands over)."""
    model = tiny(**options)
    expected = run_steps(model, reference())
    got = run_steps(model, CpuBackend())
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        if options.get("dtype") == "bf16":  # the kernels serve fp32 only: every path handed to the reference
            assert torch.equal(a, b), f"step {step}"
        else:
            assert torch.allclose(a, b, atol=2e-3 * b.abs().max().item(), rtol=0), f"step {step}"
            assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"


def test_auto_picks_the_kernels_for_fp32_on_the_cpu_only():
    assert pick("auto", "cpu", "fp32").name == ("cpu")
    assert pick("auto", "cpu", "bf16").name == "torch"
    assert pick("auto", "cuda", "fp32").name in ("cuda", "torch")  # cuda where Triton imports (test_triton_kernels)
    assert pick("torch", "cpu", "fp32").name == "torch"
    with pytest.raises(ValueError, match="backend 'triton'"):
        pick("triton", "cpu", "fp32")


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
@pytest.mark.parametrize("rows", [1, 8])
def test_a_decode_step_and_a_prefill_run_on_the_meta_device(attn_impl, rows):
    """The torch backend's forward reads nothing back from the device: on `meta` any .item(), .tolist() or
    data-dependent shape raises, so a forward that runs there has no host synchronisation (FP8 weights, FP8 cache,
    bf16 compute: the configuration a GPU runs)."""
    model = tiny("meta", attn_impl=attn_impl, dtype="bf16", fp8_weights=True, kv_cache_dtype="fp8")
    pool = pool_for(model, "meta")
    tables = [[(r * 6 + i) % BLOCKS for i in range(6)] for r in range(rows)]
    decode = StepPlan.from_rows([(tables[r], 70 + r, [5]) for r in range(rows)])
    prefill = StepPlan.from_rows([(tables[0][:3], 0, tokens(40, 9))])
    for step in (decode, prefill):
        batch = build_batch(step, BLOCK, torch.device("meta"))
        logits = model(step.tokens.to("meta"), batch, pool.layers)
        assert logits.device.type == "meta" and logits.shape == (len(step.num_new), model.args.vocab_size)


class CountDequantisations:
    """Wraps fp8.dequantize: how many weight matrices it dequantised (a stack of E counts E)."""

    def __init__(self, monkeypatch):
        self.matrices, original = 0, fp8.dequantize

        def counted(weight, scale, dtype):
            self.matrices += math.prod(weight.shape[:-2])
            return original(weight, scale, dtype)

        monkeypatch.setattr(fp8, "dequantize", counted)


@pytest.mark.parametrize("backend", [reference(), CpuBackend()], ids=["torch", "cpu"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_decode_step_dequantises_each_fp8_weight_it_uses_once(monkeypatch, backend, dtype):
    """One row's decode step: each FP8 matrix of attention and the dense and shared MLPs once, and the routed
    experts the token chose, once each; nothing for a kernel that then declines."""
    model = tiny(dtype=dtype, fp8_weights=True)
    model.use_backend(backend)
    pool = pool_for(model)
    prompt = plan([(0, 0, tokens(20, 1))])
    model(prompt.tokens, build_batch(prompt, BLOCK, torch.device("cpu")), pool.layers)
    count = CountDequantisations(monkeypatch)
    step = plan([(0, 20, [9])])
    model(step.tokens, build_batch(step, BLOCK, torch.device("cpu")), pool.layers)
    args = model.args
    moe_layers = args.n_layers - args.n_dense_layers
    attention = 5 * args.n_layers  # wq_a, wq_b, wkv_a, wkv_b, wo
    mlps = 3 * args.n_dense_layers + 3 * moe_layers  # the dense MLP's or the shared expert's w1, w2, w3
    routed = 3 * args.n_activated_experts * moe_layers
    assert count.matrices == attention + mlps + routed


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler here")
def test_the_cpu_backend_offers_decode_to_the_kernels(monkeypatch):
    """fp32 decode rows go through the compiled MoE and MLA decode kernels (which also store the new entries)."""
    calls = []
    for name in ("moe", "mla_decode"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = tiny()
    run_steps(model, CpuBackend())
    moe_layers = model.args.n_layers - model.args.n_dense_layers
    assert calls.count("mla_decode") == 3 * model.args.n_layers  # the two all-decode steps and the mixed one
    assert calls.count("moe") >= 2 * moe_layers


@pytest.mark.parametrize(("attn_impl", "sizes"), [("absorb", (2, 4)), ("naive", (4,))])
def test_the_decode_forward_compiles_whole_at_two_batch_sizes(attn_impl, sizes):
    """torch.compile(fullgraph=True) of the torch backend's decode forward, at two bucketed batch sizes (absorb, the
    default form; naive at one, each compile takes half a minute here), gives the eager logits and stores what eager
    stores."""
    torch._dynamo.reset()
    model = tiny(attn_impl=attn_impl, fp8_weights=True, kv_cache_dtype="fp8")
    model.use_backend(reference())

    def decode(tokens, batch, layers):
        return model(tokens, batch, layers)

    compiled = torch.compile(decode, fullgraph=True, dynamic=False)
    for rows in sizes:
        tables = [[(r * 6 + i) % BLOCKS for i in range(6)] for r in range(rows)]
        prefill_pool, decode_pool = pool_for(model), pool_for(model)
        for pool in (prefill_pool, decode_pool):
            for r in range(rows):
                warm = StepPlan.from_rows([(tables[r][:2], 0, tokens(24 + r, r))])
                model(warm.tokens, build_batch(warm, BLOCK, torch.device("cpu")), pool.layers)
        step = StepPlan.from_rows([(tables[r][:2], 24 + r, [3 + r]) for r in range(rows)])
        eager = model(step.tokens, build_batch(step, BLOCK, torch.device("cpu")), prefill_pool.layers)
        graph = compiled(step.tokens, build_batch(step, BLOCK, torch.device("cpu")), decode_pool.layers)
        assert torch.allclose(graph, eager, atol=1e-4 * eager.abs().max().item(), rtol=0), rows
        for a, b in zip(prefill_pool.named.values(), decode_pool.named.values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-4), "the compiled step stores what eager stores"


@pytest.mark.parametrize(("rows", "cols"), [(256, 384), (576, 512), (100, 300), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_dequantisation_matches_the_block_scales_in_float64(rows, cols, dtype):
    """Whole blocks (one broadcast multiply), ragged rows and columns (wkv_a's 576, tiny configs), and a stack of
    experts: each value weight * its block's scale, rounded once into `dtype`."""
    generator = torch.Generator().manual_seed(rows + cols)
    weights = [fp8.quantize(torch.randn(rows, cols, generator=generator)) for _ in range(3)]
    for weight, scale in [*weights, tuple(torch.stack(parts) for parts in zip(*weights, strict=True))]:
        full = scale.double().repeat_interleave(128, -2)[..., :rows, :].repeat_interleave(128, -1)[..., :cols]
        expected = (weight.double() * full).to(dtype)
        assert torch.equal(fp8.dequantize(weight, scale, dtype), expected)


@pytest.mark.parametrize(("rows", "k", "n"), [(1, 256, 384), (1, 7168, 24576), (3, 2304, 7168), (64, 512, 4096)])
def test_block_fp8_products_pass_torchs_checks_of_the_block_wise_recipes(rows, k, n):
    """On the meta device F.scaled_mm runs torch's own checks of its operands' layouts (the activations' scales
    column-major even for one row; the weight's padded to a multiple of 4 blocks of K) without a GPU; the CPU never
    takes this path."""
    from tp_infer.backends.reference import block_fp8_product, scaled_linear

    x = torch.empty(rows, k, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
    y = scaled_linear(x, weight, torch.empty(n // 128, k // 128, device="meta"))
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert not block_fp8_product(torch.ones(rows, k, dtype=torch.bfloat16), weight)


def test_activations_quantised_per_1x128_come_back_within_e4m3s_rounding():
    """Each block of 128 has its own scale (blocks of very different magnitudes here): a value comes back within
    half a step of e4m3 (3 mantissa bits) or, near zero, of its smallest subnormal step times the block's scale."""
    magnitudes = torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(128)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(1)) * magnitudes
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 3)
    back = (q.float().view(5, 3, 128) * scale[..., None]).view(5, 384)
    bound = torch.maximum(x.abs() * 2**-4, scale.repeat_interleave(128, -1) * 2**-10)
    assert ((back - x).abs() <= bound).all()
