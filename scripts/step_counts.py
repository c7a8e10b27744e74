"""What one forward does, counted rather than timed (issue 27): host synchronisations, FP8 dequantisations and
dispatched aten ops per step at DeepSeek-V3's structure, and bytes moved per decode step at its real widths.

    OMP_NUM_THREADS=2 python scripts/step_counts.py [--history 1000] [--prefill-tokens 512] [--decode-rows 1,8]
        [--before f2299d6] [--skip-bytes] [--skip-counts] [--skip-sparse] [--out FILE.json]

Every model is configs/config_671B.json's structure (61 layers, 3 dense, 256 routed experts in 8 groups, top 8 of 4
groups, sigmoid router, one shared expert), FP8 weights with 128x128 block scales, built as rank 0 of a world of 8
(TensorParallel(0, 8)) in one process with the collectives replaced by the identity (collectives_as_identity), absorb
form, the cache in the compute dtype, the pool's blocks of each row scattered (as in a server's pool, so the decode
path gathers them; a lone row on consecutive blocks is read in place instead).

1. counts, at small widths (SMALL_WIDTHS: dim 128, inter_dim and moe_inter_dim 1024, 32 heads of 32 + 16 rope and
   v 32, q_lora_rank and kv_lora_rank 128, vocabulary 1,024; every FP8 product's K is a multiple of 128 as at the
   real widths, so a dequantisation takes the same branches), random weights, on the CPU: decode of --decode-rows
   rows with --history tokens of random cache entries each, and a cold prefill of --prefill-tokens in one chunk. For
   each step, counted inside the model's forward only (the batch is built beforehand):
   - host synchronisations: calls of Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__ / numpy, and
     the aten ops that wait for the device on CUDA (SYNC_OPS, repeat_interleave without output_size, indexing with
     a boolean mask) outside those calls;
   - FP8 dequantisations: matrices through tp_infer.model.fp8.dequantize (a stack [E, N, K] counts E), against the
     FP8 matrices the step uses (attention's 5 and the dense or shared MLP's 3 per layer, and 3 per distinct local
     routed expert the router chose, read from the gates' outputs);
   - dispatched aten ops (a TorchDispatchMode), and those of them that are not views.
   Configurations: bf16 compute on the `torch` backend (the branches a GPU takes), fp32 on the `cpu` backend (the
   compiled kernels), and with --before COMMIT the same in that commit's package (bf16, and fp32 on its CPU paths):
   its tp_infer is extracted into a temporary folder and this script re-run there (--counts-only).
2. bytes, at the real widths (configs/config_671B.json as is), on the meta device (nothing allocated): decode at 1
   and 64 rows, 1K and 32K tokens of context, each op's bytes read and written (op_bytes) summed by module, against
   the minimum (minimum_bytes): every weight the step reads once (the FP8 ones with their scales; of the routed
   experts, the expected number of distinct local experts chosen, count * (1 - (1 - topk / experts) ** rows); the
   embedding's rows), the rows' cached history read once, the new entries written once. Two configurations:
   - `torch, CPU path`: the torch backend as it runs on the CPU (each FP8 weight dequantised, then the product);
   - `torch, CUDA path`: as on an sm90 GPU, where the block-FP8 products run as F.scaled_mm (reference.scaled_linear:
     the activations quantised per 1x128 by counted ops, then one product reading the FP8 weight, its scales and the
     quantised activations once, writing the output); the routed experts as the backend runs them (dequantised). A
     product that F.scaled_mm's shape checks refuse (run on meta) is counted the same and listed.
   - `cuda backend` (issue 29): tp_infer.backends.cuda on the same sm90 assumptions, its Triton kernels modelled
     (ModelledKernels: they cannot run on meta): decode attention reads each row's cached history once where it
     lies in the pool (no gather, no padding), plus its pieces' partial sums written and read back by the combine;
     an FP8 product torch's block-wise recipes refuse (wkv_a's 576 rows) reads its FP8 weight once in the Triton
     product instead of dequantising it; the routed experts' Triton kernels read the expected distinct local
     experts' FP8 weights once and the expected local pairs' activations once; wkv_b's FP8 weight is read in place
     by the per-head products around the paged decode (no dequantised copy); the activations of F.scaled_mm's
     products quantised in one launch, RMSNorm, rope and the router after its logits one launch each, each reading
     its input once and writing its output once; the rest as the torch backend. Each modelled kernel makes the
     allocations its wrapper makes.
   And a modelled line, `CUDA, experts in one scaled grouped product`: the torch backend's CUDA path with the routed
   experts' measured bytes replaced by their FP8 weights of the expected distinct experts read once, plus the
   activations in and out.

   Each path's ops dispatched in that eager step are counted too: aten ops, and each launch outside aten (a
   modelled Triton kernel, the modelled F.scaled_mm) as one; the GPU pays for each eager launch.

Progress goes to stderr, the tables to stdout; --out gets every figure as JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

import tp_infer.distributed as distributed
from tp_infer.backends import cuda as cuda_backend
from tp_infer.backends import reference as reference_backend
from tp_infer.config import ModelArgs, load_config
from tp_infer.engine.runner import StepPlan, build_batch
from tp_infer.kv.pool import KVPool
from tp_infer.model import fp8
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import DTYPES, Transformer

ROOT = Path(__file__).resolve().parent.parent
CONFIG_671B = ROOT / "configs" / "config_671B.json"
CONFIG_V32 = ROOT / "configs" / "config_v3.2.json"
WORLD_SIZE = 8
BLOCK_SIZE = 16
MULTIPROCESSORS = 132  # an H100 SXM's or H200's: how many pieces the cuda backend splits a decode history into
CUDA_BACKEND = "cuda backend"
SMALL_WIDTHS = dict(
    dim=128,
    inter_dim=1024,
    moe_inter_dim=1024,
    n_heads=32,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    vocab_size=1024,
)

# aten ops that read a value back to the host (or size their output from the data) on CUDA
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "masked_select",
    "is_nonzero",
    "equal",
    "item",
}
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
# metadata-only ops: no bytes moved
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "_reshape_alias",
    "as_strided",
    "expand",
    "expand_as",
    "view_as",
    "t",
    "transpose",
    "permute",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "slice",
    "select",
    "narrow",
    "diagonal",
    "unsqueeze",
    "squeeze",
    "unflatten",
    "detach",
    "alias",
    "lift_fresh",
    "view_as_real",
    "view_as_complex",
    "_conj",
    "conj",
    "resolve_conj",
    "resolve_neg",
    "_neg_view",
    "real",
    "imag",
}
# allocations: no bytes moved (the op that fills the memory counts its writes)
ALLOCATION_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# ops that write their output without reading it (a copy reads its source only)
WRITE_ONLY_OPS = {
    "zeros",
    "zeros_like",
    "new_zeros",
    "ones",
    "ones_like",
    "new_ones",
    "full",
    "full_like",
    "new_full",
    "fill_",
    "zero_",
    "arange",
    "scalar_tensor",
    "rand",
    "randn",
    "randint",
    "normal_",
    "uniform_",
}
GATHER_OPS = {"index_select", "index", "embedding", "gather"}  # read what they gather (their output) and the indices


# ---- the model at DeepSeek-V3's structure ----------------------------------------------------------------------------
def v3_args(small: bool, dtype: str, max_seq_len: int, config: Path = CONFIG_671B, **options) -> ModelArgs:
    """configs/config_671B.json (FP8 weights; or another config of the family, V3.2's) at its real widths, or at
    SMALL_WIDTHS with the same structure."""
    widths = SMALL_WIDTHS if small else {}
    return load_config(config, dtype=dtype, max_seq_len=max_seq_len, attn_impl="absorb").with_options(
        **widths, **options
    )


def _identity_all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    return x


def _identity_all_gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    return x


def _identity_gather(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return x


@contextlib.contextmanager
def collectives_as_identity() -> Iterator[None]:
    """Rank 0 of a world of WORLD_SIZE with no process group: tp_infer.distributed's all_reduce, all_gather_last_dim
    and gather_last_dim (which would call torch.distributed for world_size > 1) return their input, wherever a
    module of tp_infer imported them."""
    identities = {
        distributed.all_reduce: _identity_all_reduce,
        distributed.all_gather_last_dim: _identity_all_gather,
        distributed.gather_last_dim: _identity_gather,
    }
    patched = []
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("tp_infer") and m is not None]:
        for attribute, value in list(vars(module).items()):
            if callable(value) and value in identities:
                patched.append((module, attribute, value))
                setattr(module, attribute, identities[value])
    try:
        yield
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)


def build_model(args: ModelArgs, device: str, backend: str | None, seed: int = 0) -> Transformer:
    """Rank 0 of WORLD_SIZE on `device` (random weights scaled as the tests' unless meta), its backend `backend`
    where the package has backends (an older one has none: None)."""
    with torch.device(device):
        model = Transformer(args, TensorParallel(0, WORLD_SIZE))
    if backend is not None and hasattr(model, "use_backend"):
        from tp_infer.backends import pick

        model.use_backend(pick(backend, device if device != "meta" else "cpu", args.dtype))
    if device != "meta":
        fill_random(model, seed)
    return model.eval()


def fill_random(model: Transformer, seed: int) -> None:
    """FP8 weights spread over e4m3's range with block scales of 1/sqrt(fan-in) over ~100, norms near 1, a routing
    bias, unit embeddings, 1/sqrt(fan-in) matrices (tests/test_backends.py's tiny model takes them too)."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.args.dim
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dtype == torch.float8_e4m3fn:
                t.copy_(torch.randn(t.shape, generator=generator).mul_(100).clamp_(-400, 400).to(t.dtype))
            elif name.endswith("scale"):
                t.copy_(torch.rand(t.shape, generator=generator).add_(0.5) / 100 / math.sqrt(dim))
            elif "norm" in name:
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
            elif name.endswith("gate.bias"):
                t.copy_(torch.rand(t.shape, generator=generator) * 0.4 - 0.2)
            elif "embed" in name:
                t.copy_(torch.randn(t.shape, generator=generator))
            else:
                t.copy_(torch.randn(t.shape, generator=generator) / math.sqrt(t.shape[-1]))


def cache_shapes(args: ModelArgs) -> list[tuple[int, ...]]:
    """What each token leaves in a layer's cache on rank 0 (the model's declaration, or an older package's)."""
    try:
        from tp_infer.model.attention import cache_layout
    except ImportError:  # before the layout was declared in one place
        from tp_infer.model.attention import MLA

        return MLA.cache_shapes(args, WORLD_SIZE)
    return cache_layout(args, WORLD_SIZE).shapes


def cache_bytes_per_token_layer(args: ModelArgs) -> int:
    """Bytes one token's entries take in one layer's cache (the compute dtype: kv_cache_dtype auto)."""
    return sum(math.prod(shape) for shape in cache_shapes(args)) * DTYPES[args.dtype].itemsize


def make_pool(args: ModelArgs, blocks: int, device: str, seed: int = 0) -> KVPool:
    """A pool of `blocks` blocks in the compute dtype; off meta, filled with random entries (a history)."""
    pool = KVPool(args.n_layers, blocks, BLOCK_SIZE, cache_shapes(args), DTYPES[args.dtype], torch.device(device))
    if device != "meta":
        generator = torch.Generator().manual_seed(seed)
        for part in pool.named.values():
            part.copy_(torch.randn(part.shape, generator=generator))
    return pool


@dataclass(frozen=True)
class Step:
    """A step to count: its plan and the pool blocks it needs."""

    name: str
    plan: StepPlan
    blocks: int


def decode_step(rows: int, history: int, seed: int = 0) -> Step:
    """`rows` rows of one new token each after `history` cached tokens, each row's blocks scattered over the pool."""
    per_row = -(-(history + 1) // BLOCK_SIZE)
    blocks = rows * per_row
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = [order[r * per_row : (r + 1) * per_row] for r in range(rows)]
    plan = StepPlan.from_rows([(tables[r], history, [(7 * r + 5) % 997 + 2]) for r in range(rows)])
    return Step(f"decode, {rows} row{'s' if rows > 1 else ''}, {history} of history", plan, blocks)


def prefill_step(tokens: int, seed: int = 0) -> Step:
    """One cold row of `tokens` new tokens in one chunk."""
    blocks = -(-tokens // BLOCK_SIZE)
    ids = torch.randint(2, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Step(
        f"prefill of {tokens} tokens, cold, one chunk", StepPlan.from_rows([(list(range(blocks)), 0, ids)]), blocks
    )


# ---- counting --------------------------------------------------------------------------------------------------------
def op_name(func) -> str:
    return func.overloadpacket.__name__


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor views (an expanded dimension, stride 0, counts once)."""
    if t.numel() == 0:
        return 0
    return math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0) * t.element_size()


def op_bytes(func, args: tuple, kwargs: dict, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one aten op: views and allocations move nothing; ops that create or fill
    write their output only; a copy reads its source; a gather reads what it gathers and the indices; a scatter
    (index_put_, index_add_, index_copy_, scatter*) reads its values and indices (an add also the destination rows)
    and writes the rows it touches; any other op reads each distinct input tensor once (its distinct elements) and
    writes its outputs (an in-place op reads and writes self)."""
    name = op_name(func)
    if name in VIEW_OPS or name in ALLOCATION_OPS:
        return 0, 0
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    written = sum(t.numel() * t.element_size() for t in outputs)
    if name in WRITE_ONLY_OPS:
        return 0, written
    if name == "copy_":
        return distinct_bytes(args[1]), args[0].numel() * args[0].element_size()
    if name in GATHER_OPS:
        index = [t for t in tree_leaves(args[1:]) if isinstance(t, torch.Tensor)]
        return written + sum(distinct_bytes(t) for t in index), written
    if name in ("index_put_", "index_put"):
        target, indices, values = args[0], args[1], args[2]
        present = [t for t in indices if t is not None]
        shape = torch.broadcast_shapes(*(t.shape for t in present))
        touched = math.prod(shape) * math.prod(target.shape[len(indices) :]) * target.element_size()
        accumulate = len(args) > 3 and args[3]
        read = distinct_bytes(values) + sum(distinct_bytes(t) for t in present) + (touched if accumulate else 0)
        return read, touched
    if name in ("index_add_", "index_add", "index_copy_", "index_copy"):
        target, index, source = args[0], args[2], args[3]
        touched = source.numel() * target.element_size()
        return distinct_bytes(source) + distinct_bytes(index) + (touched if "add" in name else 0), touched
    if name in ("scatter_", "scatter", "scatter_add_", "scatter_add", "scatter_reduce_", "scatter_reduce"):
        target, index = args[0], args[2]
        source = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None
        touched = index.numel() * target.element_size()
        read = distinct_bytes(index) + (distinct_bytes(source) if source is not None else 0)
        return read + (touched if "add" in name or "reduce" in name else 0), touched
    destinations = {id(t) for t in tree_leaves(kwargs.get("out"))} if "out" in kwargs else set()
    seen, read = set(), 0
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and id(t) not in seen and id(t) not in destinations:
            seen.add(id(t))
            read += distinct_bytes(t)
    return read, written


def syncs_on_device(func, args: tuple, kwargs: dict) -> bool:
    """Whether an aten op waits for the device on CUDA (reads a value back or sizes its output from the data)."""
    name = op_name(func)
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # repeats as a tensor (the .Tensor overload) and no output size given
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("index", "index_put_", "index_put"):
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1]))
    return False


@dataclass
class Tally:
    """What a StepCounter saw: aten ops by name, the syncing ones, and bytes read and written by module label."""

    ops: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)
    host_reads: Counter = field(default_factory=Counter)
    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    by_op: Counter = field(default_factory=Counter)  # bytes read and written, by aten op
    dequantised: int = 0

    @property
    def aten_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def non_view_ops(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)

    @property
    def syncs(self) -> int:
        return sum(self.host_reads.values()) + sum(self.sync_ops.values())

    @property
    def bytes_moved(self) -> int:
        return sum(self.read.values()) + sum(self.written.values())


class StepCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it into `tally`, the syncing ones apart (not those a counted host read
    caused: Tensor.item's _local_scalar_dense), and each op's bytes (op_bytes) under the current module label."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally
        self.labels = ["other"]
        self.in_host_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        self.tally.ops[name] += 1
        if not self.in_host_read and syncs_on_device(func, args, kwargs):
            self.tally.sync_ops[name] += 1
        read, written = op_bytes(func, args, kwargs, out)
        self.tally.read[self.labels[-1]] += read
        self.tally.written[self.labels[-1]] += written
        self.tally.by_op[name] += read + written
        return out

    def record(self, op: str, read: int, written: int) -> None:
        """A launch made outside aten's dispatch (a modelled kernel or product), counted as one op, and its bytes
        under the current label."""
        self.tally.ops[op] += 1
        self.tally.read[self.labels[-1]] += read
        self.tally.written[self.labels[-1]] += written
        self.tally.by_op[op] += read + written


@contextlib.contextmanager
def counting_host_reads(counter: StepCounter) -> Iterator[None]:
    """Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__ / numpy called inside: each is one host
    synchronisation on a GPU (counted in the tally's host_reads by name)."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def wrap(name: str, original: Callable):
        def read_back(self, *args, **kwargs):
            counter.tally.host_reads[name] += 1
            counter.in_host_read += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.in_host_read -= 1

        return read_back

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def counting_dequantisations(tally: Tally) -> Iterator[None]:
    """fp8.dequantize wrapped: the matrices it dequantised (a stack [E, N, K] counts E) into tally.dequantised."""
    original = fp8.dequantize

    def counted(weight, scale, *args, **kwargs):
        tally.dequantised += math.prod(weight.shape[:-2])
        return original(weight, scale, *args, **kwargs)

    fp8.dequantize = counted
    try:
        yield
    finally:
        fp8.dequantize = original


def module_label(name: str, module: torch.nn.Module) -> str | None:
    """The part of the model a module's bytes are counted under (None: its parent's)."""
    kind = type(module).__name__
    if kind == "MLA":
        return "attention"
    if kind == "MoE":
        return "MoE (gate, shared and routed experts)"
    if kind == "MLP" and name.endswith(".ffn"):
        return "dense MLP"
    if (kind == "RMSNorm" and not name.startswith("layers.")) or name.endswith(("attn_norm", "ffn_norm")):
        return "norms"
    if name in ("embed", "head"):
        return name
    return None


@contextlib.contextmanager
def labelled(model: Transformer, counter: StepCounter) -> Iterator[None]:
    """Each labelled module's forward counted under its label (module_label), nested ones under the innermost."""
    handles = []
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, _l=label: counter.labels.append(_l)))
            handles.append(module.register_forward_hook(lambda m, a, o: counter.labels.pop() and None))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def routing_recorded(model: Transformer, choices: list[torch.Tensor]) -> Iterator[None]:
    """Each gate's expert indices [N, topk] appended to `choices` (cloned, read after the forward)."""
    gates = [m for m in model.modules() if type(m).__name__ == "Gate"]
    handles = [g.register_forward_hook(lambda m, a, out: choices.append(out[1].detach().clone())) for g in gates]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fp8_matrices_used(args: ModelArgs, choices: list[torch.Tensor]) -> int:
    """FP8 matrices a step reads: attention's (4 or 5) per layer, the dense MLP's or shared expert's 3, and 3 per
    distinct local routed expert chosen (rank 0 holds experts 0 .. experts / WORLD_SIZE - 1)."""
    if not args.fp8_weights:
        return 0
    attention = 5 if args.q_lora_rank else 4
    moe_layers = args.n_layers - args.n_dense_layers
    mlps = 3 * args.n_dense_layers + (3 * moe_layers if args.n_shared_experts else 0)
    local = args.n_routed_experts // WORLD_SIZE
    routed = sum(3 * int(torch.unique(c[c < local]).numel()) for c in choices)
    return attention * args.n_layers + mlps + routed


def count_forward(model: Transformer, pool: KVPool, step: Step, device: str = "cpu") -> dict:
    """One forward of `step` (its batch built beforehand), counted: syncs, dequantisations, aten ops, bytes."""
    batch = build_batch(step.plan, pool.block_size, torch.device(device))
    tokens = step.plan.tokens.to(device)
    tally, choices = Tally(), []
    counter = StepCounter(tally)
    with (
        collectives_as_identity(),
        counting_dequantisations(tally),
        routing_recorded(model, choices),
        labelled(model, counter),
        counter,
        counting_host_reads(counter),
    ):
        model(tokens, batch, pool.layers)
    result = {
        "step": step.name,
        "host_syncs": tally.syncs,
        "host_reads": dict(tally.host_reads),
        "sync_ops": dict(tally.sync_ops),
        "dequantised_matrices": tally.dequantised,
        "fp8_matrices_used": fp8_matrices_used(model.args, choices) if device != "meta" else None,
        "aten_ops": tally.aten_ops,
        "non_view_ops": tally.non_view_ops,
        "bytes_read": dict(tally.read),
        "bytes_written": dict(tally.written),
        "top_ops": tally.ops.most_common(12),
    }
    return result


def counts(configurations: list[tuple[str, str, str | None]], history: int, prefill_tokens: int, rows: list[int]):
    """Per configuration (label, compute dtype, backend), each step's counts at small widths on the CPU: decode at
    each of `rows` rows after `history` tokens, and a cold prefill. Each step runs once uncounted first."""
    steps = [decode_step(r, history) for r in rows] + [prefill_step(prefill_tokens)]
    out = {}
    for label, dtype, backend in configurations:
        args = v3_args(True, dtype, max(history, prefill_tokens) + 64)
        log(f"counts: {label}: building the model at small widths")
        model = build_model(args, "cpu", backend)
        pool = make_pool(args, max(step.blocks for step in steps), "cpu")
        results = []
        for step in steps:
            log(f"counts: {label}: {step.name}")
            with collectives_as_identity():
                model(step.plan.tokens, build_batch(step.plan, BLOCK_SIZE, torch.device("cpu")), pool.layers)
            results.append(count_forward(model, pool, step))
        out[label] = results
        del model, pool
    return out


# ---- bytes at the real widths ----------------------------------------------------------------------------------------
def expected_distinct_experts(args: ModelArgs, rows: int) -> float:
    """Distinct local experts (of rank 0's experts / WORLD_SIZE) that `rows` tokens choose, each choosing topk of all
    the experts uniformly: local * (1 - (1 - topk / experts) ** rows)."""
    local = args.n_routed_experts // WORLD_SIZE
    return local * (1 - (1 - args.n_activated_experts / args.n_routed_experts) ** rows)


def param_label(name: str) -> str:
    if name.startswith("embed"):
        return "embed"
    if name.startswith("head"):
        return "head"
    if ".attn." in name:
        return "attention"
    if "norm" in name and ".attn." not in name:
        return "norms"
    return (
        "MoE (gate, shared and routed experts)"
        if ".ffn.gate" in name or ".ffn.experts" in name or (".ffn.shared" in name)
        else "dense MLP"
    )


def minimum_bytes(model: Transformer, rows: int, context: int) -> dict[str, float]:
    """The least a decode step of `rows` rows at `context` tokens of history moves on rank 0, by label: every weight
    read once (its scales too), of the routed experts the expected distinct ones (expected_distinct_experts), of the
    embedding the rows' rows; the cached history read once and the new entries written once (in attention). With
    V3.2's indexer (sparse), where a row sees more than index_topk positions: the indexer keys of its whole history,
    and the attended entries (latent and rope key) of index_topk positions only (below that, a row reads all of them
    and no indexer key: it attends densely without scoring)."""
    args = model.args
    share = expected_distinct_experts(args, rows) / (args.n_routed_experts // WORLD_SIZE)
    out: Counter = Counter()
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("embed"):
            size = rows * p.shape[-1] * p.element_size()
        elif ".ffn.experts." in name:
            size *= share
        out[param_label(name)] += size
    per_token = cache_bytes_per_token_layer(args) * args.n_layers
    out["attention"] += per_token * rows * (context + 1)  # the history read, the new entries written
    if getattr(args, "sparse", False):
        from tp_infer.model.attention import MLA

        size = DTYPES[args.dtype].itemsize * args.n_layers * rows
        attended = sum(math.prod(shape) for shape in cache_shapes(args)[: MLA.attended]) * size
        if context + 1 > args.index_topk:  # narrowed: the attended entries of top-k positions read, not all
            out["attention"] -= attended * (context - args.index_topk)
        else:  # dense: the indexer keys written, not read
            out["attention"] -= (per_token * rows - attended) * context
    return dict(out)


def routed_expert_products(model: Transformer, rows: int) -> float:
    """Bytes of the routed experts run as one FP8 grouped product each (w1, w3, w2): the expected distinct local
    experts' weights and scales read once, the pairs' activations in (bf16) and out (hidden, then dim) once."""
    args = model.args
    experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
    per_expert = sum(
        (getattr(experts, n).numel() + getattr(experts, f"{n}_scale").numel() * 4) / experts.count
        for n in ("w1", "w2", "w3")
    )
    pairs = rows * args.n_activated_experts * experts.count / args.n_routed_experts  # the local pairs expected
    activations = pairs * 2 * (2 * args.dim + 3 * args.moe_inter_dim + args.dim)  # x twice, w1/w3 out, hidden, out
    moe_layers = args.n_layers - args.n_dense_layers
    return moe_layers * (expected_distinct_experts(args, rows) * per_expert + activations)


@contextlib.contextmanager
def cuda_products(counter: StepCounter, refused: list[str]) -> Iterator[None]:
    """The torch backend as on an sm90 GPU: block_fp8_product true for bf16 activations and K a multiple of 128, and
    F.scaled_mm run on meta for its shape checks but counted as one read of its operands and one write of its output
    (refused shapes counted the same and listed in `refused`)."""
    reference = importlib.import_module("tp_infer.backends.reference")  # the module (the package exports a function)
    original_check, original_mm = reference.block_fp8_product, F.scaled_mm

    def scaled_mm(a, b, *args, output_dtype=torch.bfloat16, **kwargs):
        scales = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        with _disable_current_modes():  # checked, and its output made, outside the count
            out = torch.empty(a.shape[0], b.shape[1], dtype=output_dtype, device=a.device)
            try:
                original_mm(a, b, *args, output_dtype=output_dtype, **kwargs)
            except RuntimeError:
                refused.append(f"[{a.shape[0]}, {a.shape[1]}] x [{b.shape[0]}, {b.shape[1]}]")
        read = distinct_bytes(a) + distinct_bytes(b) + sum(distinct_bytes(s) for s in scales)
        counter.record("scaled_mm (modelled)", read, out.numel() * out.element_size())
        return out

    reference.block_fp8_product = lambda x, weight: x.dtype == torch.bfloat16 and weight.shape[1] % fp8.BLOCK == 0
    F.scaled_mm = scaled_mm
    try:
        yield
    finally:
        reference.block_fp8_product, F.scaled_mm = original_check, original_mm


class ModelledKernels:
    """The cuda backend's Triton kernels (tp_infer.backends.triton_kernels) on meta, where they cannot run: each
    returns an empty output of its shape and is counted as the kernel moves bytes. Paged decode reads each row's
    `history` cached positions once where they lie (values and FP8 scales; the pieces past a row's length read
    nothing), the queries, block table and lengths, writes each piece's partial sums and log-sum-exp in fp32, which
    the combine reads back, and writes the output; pieces as on a GPU of MULTIPROCESSORS (cuda.decode_split_tokens).
    The block-FP8 product reads x, the FP8 weight and its scales once and writes y."""

    def __init__(self, counter: StepCounter, history: int, args: ModelArgs | None = None):
        self.counter, self.history, self.args = counter, history, args

    def runs_on(self, t: torch.Tensor, fp8: bool = False) -> bool:
        return True

    def _pieces(self, rows: int, groups: int, max_tokens: int, block_n: int) -> int:
        split = cuda_backend.decode_split_tokens(rows, groups, max_tokens, MULTIPROCESSORS, block_n)
        return -(-max_tokens // split)

    def _decode(
        self, queries, cached, table, lengths, heads: int, out_dim: int, pieces: int, dtype, selected=None
    ) -> torch.Tensor:
        rows = table.shape[0]
        per_token = sum(t.numel() // (t.shape[0] * t.shape[1]) * t.element_size() for t in cached if t is not None)
        history = self.history if selected is None else min(self.history, selected.shape[1])
        extra = () if selected is None else (selected,)
        read = sum(distinct_bytes(t) for t in (*queries, table, lengths, *extra)) + rows * history * per_token
        partial = rows * heads * pieces * (out_dim + 1) * 4
        torch.empty(rows, heads, pieces, out_dim, dtype=torch.float32, device=table.device)  # as the wrapper allocates
        torch.empty(rows, heads, pieces, dtype=torch.float32, device=table.device)
        out = torch.empty(rows, heads, out_dim, dtype=dtype, device=table.device)
        self.counter.record("paged decode (modelled)", read, partial)
        self.counter.record("decode combine (modelled)", partial, out.numel() * out.element_size())
        return out

    def mla_decode(
        self, q_latent, q_pe, latent, latent_scale, rope, rope_scale, table, lengths, sm_scale, selected=None, **_
    ):
        """Sparse (selected given: V3.2): the selected positions' entries only, and the positions read."""
        rows, heads, latent_dim = q_latent.shape
        groups = -(-heads // cuda_backend.DECODE_BLOCK_H)
        max_tokens = table.shape[1] * latent.shape[1] if selected is None else selected.shape[1]
        pieces = self._pieces(rows, groups, max_tokens, cuda_backend.decode_block_n(latent_dim))
        cached = (latent, latent_scale, rope, rope_scale)
        return self._decode(
            (q_latent, q_pe), cached, table, lengths, heads, latent_dim, pieces, q_latent.dtype, selected
        )

    def mha_decode(self, q, keys, key_scale, values, value_scale, table, lengths, sm_scale, selected=None, **_):
        rows, heads, _ = q.shape
        max_tokens = table.shape[1] * keys.shape[1] if selected is None else selected.shape[1]
        pieces = self._pieces(rows, heads, max_tokens, cuda_backend.PER_HEAD_BLOCK_N)
        cached = (keys, key_scale, values, value_scale)
        return self._decode((q,), cached, table, lengths, heads, values.shape[-1], pieces, q.dtype, selected)

    def index_scores(self, q, weights, keys, key_scale, table, lengths, **_):
        """V3.2's index scores: the queries, weights, table and lengths, each row's `history` indexer keys (and
        their FP8 scales) once where they lie; the score key (int64) of every table position written."""
        rows = table.shape[0]
        per_token = sum(
            t.numel() // (t.shape[0] * t.shape[1]) * t.element_size() for t in (keys, key_scale) if t is not None
        )
        read = sum(distinct_bytes(t) for t in (q, weights, table, lengths)) + rows * self.history * per_token
        scores = torch.empty(rows, table.shape[1] * keys.shape[1], dtype=torch.int64, device=table.device)
        self.counter.record("index scores (modelled)", read, scores.numel() * scores.element_size())
        return scores

    def fp8_experts(self, x, order, pair_weights, bounds, weights, scales):
        """The expert kernels of a step of `rows` tokens choosing topk of the model's experts uniformly: the
        expected distinct local experts' FP8 weights and scales read once (a decode step's pairs per expert fit one
        tile), the expected local pairs' tokens and hidden values read and written once, outputs written; the
        wrapper's allocations (hidden values, zeroed outputs) made as it makes them."""
        rows, experts = x.shape[0], bounds.shape[0] - 1
        topk = order.shape[0] // rows
        share = topk / self.args.n_routed_experts
        distinct = experts * (1 - (1 - share) ** rows)
        per_expert = sum(
            (w.numel() * w.element_size() + s.numel() * s.element_size()) / w.shape[0]
            for w, s in zip(weights, scales, strict=True)
        )
        pairs = rows * topk * experts * share / topk  # the local ones expected
        dim, inter, size = x.shape[1], weights[0].shape[1], x.element_size()
        schedule = sum(distinct_bytes(t) for t in (order, pair_weights, bounds))
        torch.empty(order.shape[0], inter, dtype=x.dtype, device=x.device)  # the hidden values
        up = distinct * per_expert * 2 / 3 + pairs * dim * size + schedule
        self.counter.record("Triton FP8 experts, gate and up (modelled)", int(up), int(pairs * inter * size))
        out = torch.zeros(rows, topk, dim, dtype=x.dtype, device=x.device)
        down = distinct * per_expert / 3 + pairs * inter * size + schedule
        self.counter.record("Triton FP8 experts, down (modelled)", int(down), int(pairs * dim * size))
        return out

    def fp8_heads(self, x, weight, scale, out_features, rows_per_head, first_row, k_along_rows):
        """Per-head products with windows of an FP8 weight: x, each head's window (and its share of the block
        scales) read once, y written."""
        rows, heads, k = x.shape
        window = heads * k * out_features
        read = distinct_bytes(x) + window * weight.element_size() + window * scale.element_size() / fp8.BLOCK**2
        out = torch.empty(rows, heads, out_features, dtype=x.dtype, device=x.device)
        self.counter.record("Triton per-head FP8 products (modelled)", int(read), out.numel() * out.element_size())
        return out

    def fp8_linear(self, x, weight, scale):
        x.reshape(-1, x.shape[-1])  # as the wrapper does
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        read = distinct_bytes(x) + distinct_bytes(weight) + distinct_bytes(scale)
        self.counter.record("Triton block-FP8 product (modelled)", read, out.numel() * out.element_size())
        return out

    def takes(self, **_) -> bool:
        return True

    def route(self, logits, bias, *, topk: int, out_dtype, **_):
        """The router after its logits (triton_router.route): the logits and bias read once, the weights and
        indices written once."""
        weights = torch.empty(logits.shape[0], topk, dtype=out_dtype, device=logits.device)
        indices = torch.empty(logits.shape[0], topk, dtype=torch.int64, device=logits.device)
        read = distinct_bytes(logits) + (0 if bias is None else distinct_bytes(bias))
        self.counter.record("Triton router (modelled)", read, distinct_bytes(weights) + distinct_bytes(indices))
        return weights, indices

    def quantize_rows(self, x):
        """x read once; its e4m3 values and fp32 scales (one per 128) written once, in the layouts the kernel
        writes."""
        rows, k = x.shape
        q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty_strided((rows, k // fp8.BLOCK), (1, rows), dtype=torch.float32, device=x.device)
        self.counter.record(
            "Triton activation quantisation (modelled)", distinct_bytes(x), q.numel() + scale.numel() * 4
        )
        return q, scale

    def rms_norm(self, x, weight, eps):
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.counter.record("Triton RMSNorm (modelled)", distinct_bytes(x) + distinct_bytes(weight), distinct_bytes(y))
        return y

    def rope(self, x, rotations, out=None):
        """x and its tokens' rotations read once, the rotated values written once (into x itself where out is x)."""
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        read = distinct_bytes(x) + x.shape[0] * rotations[0].numel() * rotations.element_size()
        self.counter.record("Triton rope (modelled)", read, x.numel() * x.element_size())
        return y


@contextlib.contextmanager
def cuda_backend_kernels(counter: StepCounter, history: int, args: ModelArgs) -> Iterator[None]:
    """The cuda backend as on an sm90 GPU, on meta: its Triton kernels modelled (ModelledKernels), and torch's
    block-scaled product where the backend's rule takes it (bf16, whole 128-blocks: every FP8 weight but wkv_a's),
    counted as cuda_products counts it."""
    kernels, router, rule = cuda_backend.triton_kernels, cuda_backend.triton_router, cuda_backend.block_fp8_product
    modelled = ModelledKernels(counter, history, args)
    cuda_backend.triton_kernels = cuda_backend.triton_router = lambda: modelled
    cuda_backend.block_fp8_product = lambda x, weight: (
        x.dtype == torch.bfloat16 and weight.shape[0] % fp8.BLOCK == weight.shape[1] % fp8.BLOCK == 0
    )
    try:
        yield
    finally:
        cuda_backend.triton_kernels, cuda_backend.triton_router, cuda_backend.block_fp8_product = kernels, router, rule


def path_bytes(model: Transformer, args: ModelArgs, step: Step, pool: KVPool, context: int, path: str) -> dict:
    """What one decode step moves on meta on `path` (torch, CPU path; torch, CUDA path; cuda backend), by label."""
    tally, refused = Tally(), []
    counter = StepCounter(tally)
    on_gpu = path != "torch, CPU path"
    products = cuda_products(counter, refused) if on_gpu else contextlib.nullcontext()
    kernels = contextlib.nullcontext()
    if path == CUDA_BACKEND:
        model.use_backend(cuda_backend.CudaBackend())
        kernels = cuda_backend_kernels(counter, context + 1, args)
    batch = build_batch(step.plan, BLOCK_SIZE, torch.device("meta"))
    try:
        with (
            collectives_as_identity(),
            counting_dequantisations(tally),
            labelled(model, counter),
            products,
            kernels,
            counter,
        ):
            model(step.plan.tokens.to("meta"), batch, pool.layers)
    finally:
        model.use_backend(reference_backend())
    return {
        "read": dict(tally.read),
        "written": dict(tally.written),
        "total": tally.bytes_moved,
        "dequantised_matrices": tally.dequantised,
        "aten_ops": tally.aten_ops,
        "non_view_ops": tally.non_view_ops,
        "launches": {op: n for op, n in tally.ops.items() if op.endswith("(modelled)")},
        "refused_scaled_mm": sorted(set(refused)),
        "top_ops": tally.by_op.most_common(8),
    }


def bytes_per_step(rows_list: list[int], contexts: list[int]) -> list[dict]:
    """Bytes moved per decode step at the real widths on meta, torch backend, CPU and CUDA paths, against the
    minimum."""
    out = []
    for context in contexts:
        args = v3_args(False, "bf16", context + 64)
        model = build_model(args, "meta", "torch")
        for rows in rows_list:
            step = decode_step(rows, context)
            pool = make_pool(args, step.blocks, "meta")
            minimum = minimum_bytes(model, rows, context)
            entry = {"rows": rows, "context": context, "minimum": minimum, "paths": {}}
            for path in ("torch, CPU path", "torch, CUDA path", CUDA_BACKEND):
                log(f"bytes: {rows} rows, {context} context, {path}")
                entry["paths"][path] = path_bytes(model, args, step, pool, context, path)
            cuda = entry["paths"]["torch, CUDA path"]
            moe = "MoE (gate, shared and routed experts)"
            routed_measured = routed_bytes_on_meta(model, rows, context, step, pool)
            modelled = cuda["total"] - routed_measured + routed_expert_products(model, rows)
            entry["paths"]["CUDA, experts in one scaled grouped product (modelled)"] = {
                "total": modelled,
                "routed_measured": routed_measured,
                "moe_measured": cuda["read"].get(moe, 0) + cuda["written"].get(moe, 0),
            }
            entry["minimum_total"] = sum(minimum.values())
            out.append(entry)
            del pool
    return out


def sparse_bytes_per_step(rows_list: list[int], contexts: list[int]) -> list[dict]:
    """Bytes moved per decode step of DeepSeek-V3.2 (configs/config_v3.2.json: V3's widths and the lightning
    indexer, 64 heads of 128, top 2,048) at its real widths on meta, the torch backend's CUDA path and the cuda
    backend, against V3.2's minimum (minimum_bytes: the attended entries of at most top-k positions a row, and the
    indexer keys of the whole history once where the indexer narrows); beside them the same step of V3 (no indexer)
    on the cuda backend."""
    out = []
    for context in contexts:
        sparse_args = v3_args(False, "bf16", context + 64, config=CONFIG_V32)
        dense_args = v3_args(False, "bf16", context + 64)
        sparse, dense = build_model(sparse_args, "meta", "torch"), build_model(dense_args, "meta", "torch")
        for rows in rows_list:
            step = decode_step(rows, context)
            minimum = minimum_bytes(sparse, rows, context)
            entry = {"rows": rows, "context": context, "minimum": minimum, "paths": {}}
            pool = make_pool(sparse_args, step.blocks, "meta")
            for path in ("torch, CUDA path", CUDA_BACKEND):
                log(f"bytes, V3.2: {rows} rows, {context} context, {path}")
                entry["paths"][path] = path_bytes(sparse, sparse_args, step, pool, context, path)
            pool = make_pool(dense_args, step.blocks, "meta")
            log(f"bytes, V3: {rows} rows, {context} context, {CUDA_BACKEND}")
            entry["paths"][f"V3, {CUDA_BACKEND}"] = path_bytes(dense, dense_args, step, pool, context, CUDA_BACKEND)
            entry["v3_minimum_total"] = sum(minimum_bytes(dense, rows, context).values())
            entry["minimum_total"] = sum(minimum.values())
            out.append(entry)
            del pool
    return out


def routed_bytes_on_meta(model: Transformer, rows: int, context: int, step: Step, pool: KVPool) -> int:
    """Bytes the backend's routed experts move in one decode step on the CUDA path (what a grouped FP8 product would
    replace): every layer's backend.experts minus its shared expert (swiglu), counted on meta."""
    backend = model.backend
    tally, refused = Tally(), []
    counter = StepCounter(tally)
    original_experts, original_swiglu = backend.experts, backend.swiglu

    def experts(*args, **kwargs):
        counter.labels.append("routed")
        try:
            return original_experts(*args, **kwargs)
        finally:
            counter.labels.pop()

    def swiglu(*args, **kwargs):
        counter.labels.append("shared")
        try:
            return original_swiglu(*args, **kwargs)
        finally:
            counter.labels.pop()

    backend.experts, backend.swiglu = experts, swiglu
    batch = build_batch(step.plan, BLOCK_SIZE, torch.device("meta"))
    try:
        with collectives_as_identity(), cuda_products(counter, refused), counter:
            model(step.plan.tokens.to("meta"), batch, pool.layers)
    finally:
        del backend.experts, backend.swiglu
    return tally.read["routed"] + tally.written["routed"]


# ---- printing --------------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f}"


def print_counts(results: dict) -> None:
    print("\n1. per step, at DeepSeek-V3's structure and small widths, rank 0 of 8, FP8 weights (inside the forward)")
    print(
        "| configuration | step | host syncs | FP8 dequantisations (matrices) | FP8 matrices used | aten ops "
        "| of them not views |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, steps in results.items():
        for s in steps:
            detail = ", ".join(f"{k} {v}" for k, v in {**s["host_reads"], **s["sync_ops"]}.items())
            syncs = f"{s['host_syncs']}" + (f" ({detail})" if detail else "")
            print(
                f"| {label} | {s['step']} | {syncs} | {s['dequantised_matrices']:,} | {s['fp8_matrices_used']:,} "
                f"| {s['aten_ops']:,} | {s['non_view_ops']:,} |"
            )


def print_bytes(results: list[dict]) -> None:
    print("\n2. bytes moved per decode step at DeepSeek-V3's real widths, rank 0 of 8 (GB; on the meta device)")
    columns = (
        "torch, CPU path",
        "torch, CUDA path",
        "CUDA, experts in one scaled grouped product (modelled)",
        CUDA_BACKEND,
    )
    print("| rows | context | minimum | " + " | ".join(f"{c} | ratio" for c in columns) + " |")
    print("|---" * (3 + 2 * len(columns)) + "|")
    for e in results:
        lo = e["minimum_total"]
        moved = [e["paths"][c]["total"] for c in columns]
        cells = " | ".join(f"{gb(m)} | {m / lo:.2f}x" for m in moved)
        print(f"| {e['rows']} | {e['context']:,} | {gb(lo)} | {cells} |")
    for e in results:
        print(f"\nby part, {e['rows']} rows at {e['context']:,} of context (GB moved; minimum)")
        paths = ("torch, CPU path", "torch, CUDA path", CUDA_BACKEND)
        print("| part | minimum | " + " | ".join(paths) + " |")
        print("|---" * (2 + len(paths)) + "|")
        parts = sorted({*e["minimum"], *e["paths"][paths[0]]["read"]})
        for part in parts:
            moved = [e["paths"][p]["read"].get(part, 0) + e["paths"][p]["written"].get(part, 0) for p in paths]
            print(f"| {part} | {gb(e['minimum'].get(part, 0))} | " + " | ".join(gb(m) for m in moved) + " |")
        for path in paths:
            top = ", ".join(f"{op} {gb(n)}" for op, n in e["paths"][path]["top_ops"][:6])
            dequantised = e["paths"][path]["dequantised_matrices"]
            print(f"{path}: {dequantised:,} FP8 matrices dequantised; most bytes (GB): {top}")
        refused = e["paths"]["torch, CUDA path"]["refused_scaled_mm"]
        if refused:
            print(f"F.scaled_mm's checks refuse (on meta): {', '.join(refused)}")
    print("\ndispatched ops per eager decode step at the real widths (aten ops, and each launch made outside aten:")
    print("a Triton kernel, F.scaled_mm, counted as one; views apart)")
    paths = ("torch, CPU path", "torch, CUDA path", CUDA_BACKEND)
    print("| rows | context | " + " | ".join(paths) + " |")
    print("|---" * (2 + len(paths)) + "|")
    for e in results:
        cells = " | ".join(
            f"{e['paths'][p]['aten_ops']:,} ({e['paths'][p]['non_view_ops']:,} not views)" for p in paths
        )
        print(f"| {e['rows']} | {e['context']:,} | {cells} |")


def print_sparse_bytes(results: list[dict]) -> None:
    print(
        "\n3. bytes moved per decode step of DeepSeek-V3.2 (top 2,048 of the history attended) at its real widths, "
        "rank 0 of 8 (GB; on the meta device), beside V3's on the cuda backend"
    )
    columns = ("torch, CUDA path", CUDA_BACKEND)
    print(
        "| rows | context | minimum | "
        + " | ".join(f"{c} | ratio" for c in columns)
        + f" | V3 minimum | V3, {CUDA_BACKEND} | V3.2 / V3 (cuda backend) |"
    )
    print("|---" * (6 + 2 * len(columns)) + "|")
    for e in results:
        lo = e["minimum_total"]
        cells = " | ".join(f"{gb(e['paths'][c]['total'])} | {e['paths'][c]['total'] / lo:.2f}x" for c in columns)
        v3 = e["paths"][f"V3, {CUDA_BACKEND}"]["total"]
        ratio = e["paths"][CUDA_BACKEND]["total"] / v3
        print(
            f"| {e['rows']} | {e['context']:,} | {gb(lo)} | {cells} | {gb(e['v3_minimum_total'])} | {gb(v3)} "
            f"| {ratio:.2f} |"
        )
    for e in results:
        path = e["paths"][CUDA_BACKEND]
        top = ", ".join(f"{op} {gb(n)}" for op, n in path["top_ops"][:6])
        attention = path["read"].get("attention", 0) + path["written"].get("attention", 0)
        print(
            f"V3.2, {e['rows']} rows at {e['context']:,}, {CUDA_BACKEND}: attention {gb(attention)} GB (minimum "
            f"{gb(e['minimum'].get('attention', 0))}); most bytes (GB): {top}"
        )


# ---- before: an older commit's package -------------------------------------------------------------------------------
def counts_at(commit: str, history: int, prefill_tokens: int, rows: list[int]) -> dict:
    """The counts of configurations bf16 and fp32 run by this script in `commit`'s package (its tp_infer extracted
    into a temporary folder, first on PYTHONPATH)."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "tp_infer"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        out = Path(folder) / "counts.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, __file__, "--counts-only", str(out), "--history", str(history)]
        command += ["--prefill-tokens", str(prefill_tokens), "--decode-rows", ",".join(map(str, rows))]
        subprocess.run(command, check=True, env=env, cwd=folder)
        return json.loads(out.read_text())


def parse_rows(ctx, param, value: str) -> list[int]:
    try:
        rows = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated row counts, e.g. 1,8") from None
    if not rows or min(rows) < 1:
        raise click.BadParameter(f"{value!r}: row counts must be positive")
    return rows


@click.command()
@click.option("--history", default=1000, show_default=True, type=click.IntRange(min=1), help="Decode: history.")
@click.option("--prefill-tokens", default=512, show_default=True, type=click.IntRange(min=2), help="Prefill chunk.")
@click.option("--decode-rows", default="1,8", show_default=True, callback=parse_rows, help="Decode batch sizes.")
@click.option("--bytes-rows", default="1,64", show_default=True, callback=parse_rows, help="Bytes: batch sizes.")
@click.option("--bytes-contexts", default="1024,32768", show_default=True, callback=parse_rows, help="Bytes: context.")
@click.option("--before", help="Also count the package of this commit (e.g. f2299d6, main before issue 27).")
@click.option("--skip-counts", is_flag=True, help="Skip section 1.")
@click.option("--skip-bytes", is_flag=True, help="Skip section 2.")
@click.option("--skip-sparse", is_flag=True, help="Skip section 3 (DeepSeek-V3.2's bytes).")
@click.option("--counts-only", type=click.Path(dir_okay=False), hidden=True, help="(internal) --before's child.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def main(
    history,
    prefill_tokens,
    decode_rows,
    bytes_rows,
    bytes_contexts,
    before,
    skip_counts,
    skip_bytes,
    skip_sparse,
    counts_only,
    out,
) -> None:
    """Host syncs, FP8 dequantisations, aten ops and bytes moved per step at DeepSeek-V3's structure (issue 27)."""
    started = time.perf_counter()
    torch.manual_seed(0)
    if counts_only:  # an older package: no backends, its own CPU paths at fp32
        configurations = [("bf16", "bf16", None), ("fp32", "fp32", None)]
        results = counts(configurations, history, prefill_tokens, decode_rows)
        Path(counts_only).write_text(json.dumps(results))
        return
    results: dict = {
        "settings": {
            "history": history,
            "prefill_tokens": prefill_tokens,
            "world_size": WORLD_SIZE,
            "small_widths": SMALL_WIDTHS,
            "torch": torch.__version__,
        }
    }
    if not skip_counts:
        configurations = [("torch backend, bf16", "bf16", "torch"), ("cpu backend, fp32", "fp32", "cpu")]
        results["counts"] = counts(configurations, history, prefill_tokens, decode_rows)
        if before:
            log(f"counts: the package at {before}")
            older = counts_at(before, history, prefill_tokens, decode_rows)
            results["counts"].update({f"{before}, {label}": steps for label, steps in older.items()})
        print_counts(results["counts"])
    if not skip_bytes:
        results["bytes"] = bytes_per_step(bytes_rows, bytes_contexts)
        print_bytes(results["bytes"])
    if not skip_sparse:
        results["sparse_bytes"] = sparse_bytes_per_step(bytes_rows, bytes_contexts)
        print_sparse_bytes(results["sparse_bytes"])
    results["runtime_s"] = time.perf_counter() - started
    print(f"\ntotal runtime {results['runtime_s']:.0f} s")
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
