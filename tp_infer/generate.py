"""Command line: `torchrun --nproc-per-node N -m tp_infer.generate --ckpt-path DIR (--interactive | --input-file IN
--output-file OUT)`. Every rank loads its shard; rank 0 drives the console or the batch job, the others follow."""

import contextlib
import functools
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import click
import torch

from tp_infer.backends import BACKENDS, pick
from tp_infer.chat import ReplyMemory
from tp_infer.checkpoint import CheckpointError, load_model, weight_bytes
from tp_infer.config import ConfigError, ModelArgs, load_config
from tp_infer.distributed import (
    CollectiveError,
    DistContext,
    StartupError,
    agree,
    control_group,
    init_distributed,
    min_over_ranks,
)
from tp_infer.engine.engine import Engine
from tp_infer.engine.graphs import CapturedDecode, CudaGraphCapture, DecodeGraphs, prepare_on_every_rank
from tp_infer.engine.runner import ModelRunner, RemoteAbort
from tp_infer.engine.sampling import SEED_RANGE, SamplingParams
from tp_infer.failures import report_failure
from tp_infer.kv.disk import DiskFiles, check_folder, fingerprint
from tp_infer.kv.manager import BlockManager
from tp_infer.kv.memory import describe, measured_bytes, size_pool, size_tiers
from tp_infer.kv.tiers import make_tiers
from tp_infer.model import kernels
from tp_infer.model.attention import cache_layout
from tp_infer.model.layers import TensorParallel
from tp_infer.tokenizer import ChatTokenizer, TokenizerError

# Options of every front end: the checkpoint, the engine, sampling defaults, the launch.
ENGINE_OPTIONS = [
    click.option(
        "--ckpt-path",
        required=True,
        type=click.Path(),
        help="Converted checkpoint folder (model{rank}-mp{N}.safetensors, config.json, tokenizer).",
    ),
    click.option(
        "--config",
        "config_path",
        type=click.Path(),
        help="Model config JSON (reference or Hugging Face style); default: CKPT_PATH/config.json.",
    ),
    click.option(
        "--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Tokens per reply at most."
    ),
    click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 is greedy."),
    click.option(
        "--top-p",
        default=1.0,
        show_default=True,
        type=click.FloatRange(0, 1, min_open=True),
        help="Nucleus sampling mass.",
    ),
    click.option(
        "--top-k",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="Sample among the k likeliest tokens (0: all).",
    ),
    click.option(
        "--seed",
        default=0,
        show_default=True,
        type=click.IntRange(*SEED_RANGE),
        help="Random seed of sampling (each conversation draws its own stream).",
    ),
    click.option("--ignore-eos", is_flag=True, help="Do not stop at end of sentence (benchmarks)."),
    click.option(
        "--attn-impl",
        type=click.Choice(["naive", "absorb"]),
        help="Cache per-head k/v (naive) or the shared latent (absorb, default).",
    ),
    click.option("--max-seq-len", type=click.IntRange(min=1), help="Longest conversation in tokens (overflow policy)."),
    click.option("--max-batch-size", type=click.IntRange(min=1), help="Turns running at once (default 8)."),
    click.option(
        "--max-num-batched-tokens",
        default=512,
        show_default=True,
        type=click.IntRange(min=1),
        help="Tokens one step computes at most: every decoding turn's next token, then prefill chunks.",
    ),
    click.option(
        "--schedule",
        default="mixed",
        show_default=True,
        type=click.Choice(["mixed", "prefill-first"]),
        help="mixed: decoding goes on while others prefill; prefill-first: steps that prefill carry nothing else.",
    ),
    click.option("--dtype", type=click.Choice(["bf16", "fp32"]), help="Compute dtype (default bf16)."),
    click.option(
        "--device",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "cpu", "cuda"]),
        help="Where the ranks compute.",
    ),
    click.option(
        "--kv-cache-dtype",
        type=click.Choice(["auto", "bf16", "fp32", "fp8"]),
        help="KV cache storage; fp8 keeps e4m3 with a scale per token (auto: the compute dtype).",
    ),
    click.option(
        "--kv-cache-memory",
        help="Size of the KV pool per rank: gigabytes (12, 12GB) or, on CUDA, a share of the free memory left after "
        "the weights (90%). Default: max_batch_size x max_seq_len tokens.",
    ),
    click.option(
        "--block-size",
        default=16,
        show_default=True,
        type=click.IntRange(min=1),
        help="Tokens per block of the KV pool (a power of two).",
    ),
    click.option(
        "--kv-host-memory",
        help="Host tier under the KV pool, per rank, in gigabytes: blocks the pool evicts move there and come back by "
        "copy when a conversation returns. Default: none, or with --kv-disk-path as many blocks as the pool.",
    ),
    click.option(
        "--kv-disk-path",
        type=click.Path(file_okay=False),
        help="Disk tier: blocks the host tier evicts, and at the end of the job everything cached, are kept in files "
        "here, which later jobs on the same checkpoint and settings find (created private to the user).",
    ),
    click.option(
        "--kv-disk-size",
        default="16",
        show_default=True,
        help="Gigabytes the disk tier's files may take in all; the least recently used are deleted beyond it.",
    ),
    click.option(
        "--backend",
        default="auto",
        show_default=True,
        type=click.Choice(BACKENDS),
        help="Where the model's hardware paths run: torch (PyTorch's ops on any device, no host synchronisation "
        "inside a step), cpu (tp_infer's compiled kernels and oneDNN, fp32 on the CPU), cuda (Triton kernels on the "
        "GPU: paged MLA decode, block-FP8 products and experts); auto: cpu for fp32 on the CPU, cuda on CUDA where "
        "Triton imports, else torch.",
    ),
    click.option(
        "--compile",
        "compile_decode",
        is_flag=True,
        help="Run decode steps compiled whole (torch.compile(fullgraph=True), the torch backend), one graph per batch "
        "size bucket (1, 2, 4, ... up to --max-batch-size) compiled at start-up; other steps run eager.",
    ),
    click.option(
        "--cuda-graphs",
        is_flag=True,
        help="On CUDA, replay each batch bucket's decode step (1, 2, 4, ... up to --max-batch-size) as a CUDA graph "
        "captured at start-up: alone, the cuda backend's eager step over static buffers as wide as --max-seq-len; with "
        "--compile, the torch backend's compiled step (torch.compile's reduce-overhead mode). Other steps, and any "
        "where a rank fails to capture, run eager.",
    ),
    click.option(
        "--cpu-kernels/--no-cpu-kernels",
        default=True,
        show_default=True,
        help="On the CPU in fp32, decode's layers (products, SwiGLU, norms, rope, MoE, attention) run in tp_infer's "
        "compiled kernels (built with the system's C compiler on first use), and wider products and prefill "
        "attention in oneDNN's products; off: PyTorch's usual paths alone (--backend auto then picks torch).",
    ),
    click.option(
        "--no-reuse", is_flag=True, help="Re-prefill the whole conversation every turn, as DeepSeek's reference does."
    ),
    click.option(
        "--collective-timeout",
        default=20.0,
        show_default=True,
        type=click.FloatRange(min=1),
        help="Seconds a rank waits for the others in one of the model's collectives (and rank 0 for the others to take "
        "its next step) before the job is declared broken.",
    ),
    click.option("--pid-file", type=click.Path(), help="Rank 0 writes its process id here (for launch scripts)."),
    click.option(
        "--exit-status-file",
        type=click.Path(),
        help="Rank 0 writes its exit status here as it ends (for launch scripts: torchrun reports every failure as 1).",
    ),
]


def engine_options(command):
    """Apply ENGINE_OPTIONS to a click command."""
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command


class FrontEnd(ABC):
    """What rank 0 runs on the engine: the console, a batch job, the HTTP server."""

    chat_required = False  # needs a tokenizer with a chat template

    def check(self) -> None:  # noqa: B027 (most front ends have nothing to check)
        """Rank 0, before loading: refuse what cannot work (ValueError or OSError with a one-line message)."""

    @abstractmethod
    def run(
        self, engine: Engine, tokenizer: ChatTokenizer | None, sampling: SamplingParams, seed: int, replies: ReplyMemory
    ) -> int:
        """Serve until done; returns rank 0's exit status. replies: the ids of replies generated here (and, with a
        disk tier, by earlier jobs), for conversations sent back as text."""


@dataclass
class ConsoleFrontEnd(FrontEnd):
    system: str | None
    show_stats: bool
    chat_required = True

    def run(self, engine, tokenizer, sampling, seed, replies) -> int:
        from tp_infer.console import Console

        Console(engine, tokenizer, sampling, self.system, show_stats=self.show_stats, seed=seed).run()
        return 0


@dataclass
class BatchFrontEnd(FrontEnd):
    input_file: str
    output_file: str

    def check(self) -> None:
        if not Path(self.input_file).is_file():
            raise ValueError(f"--input-file {self.input_file}: no such file")
        try:
            with open(self.output_file, "a"):  # the job appends to it; creating it early proves it can
                pass
        except OSError as e:
            raise ValueError(f"--output-file {self.output_file}: cannot be written ({e.strerror})") from None

    def run(self, engine, tokenizer, sampling, seed, replies) -> int:
        from tp_infer.batch import run_batch

        return run_batch(engine, tokenizer, self.input_file, self.output_file, sampling, seed, replies)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@engine_options
@click.option("--interactive", is_flag=True, help="Chat in a console on rank 0.")
@click.option("--input-file", type=click.Path(), help="Batch job: JSONL of conversations.")
@click.option("--output-file", type=click.Path(), help="Batch job: JSONL of results; rerunning resumes it.")
@click.option("--system", help="System prompt of the console's conversations.")
@click.option("--no-turn-stats", is_flag=True, help="Console: no reuse/speed line after each reply.")
def main(interactive, input_file, output_file, system, no_turn_stats, **options):
    """Tensor-parallel DeepSeek-V2/V3/V3.2 inference whose multi-turn conversations never recompute their history."""

    def front_end() -> FrontEnd:
        if interactive == bool(input_file or output_file) or (input_file is None) != (output_file is None):
            raise click.UsageError("give either --interactive or both --input-file and --output-file")
        if interactive:
            return ConsoleFrontEnd(system, show_stats=not no_turn_stats)
        return BatchFrontEnd(input_file, output_file)

    start(front_end, **options)


def start(front_end: Callable[[], FrontEnd], pid_file, exit_status_file, **options) -> NoReturn:
    """Run a front end on rank 0 over every rank's model, and exit with rank 0's status."""
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")

    def leave(status: int, now: bool = False):
        if rank0 and exit_status_file:
            Path(exit_status_file).write_text(f"{status}\n")
        sys.stderr.flush()
        if now:
            os._exit(status)  # the process group may be broken: tearing it down could hang
        sys.exit(status)

    try:
        status = launch(front_end(), **options)
    except click.ClickException as e:  # the same on every rank: rank 0 says it
        if rank0:
            e.show()
        else:  # torchrun stops every rank as soon as one exits: let rank 0 say it first
            time.sleep(1.0)
        leave(e.exit_code)
    except LostRank:
        leave(1, now=True)
    leave(status)


class LostRank(Exception):
    """A failure after which the process group cannot be trusted; already reported."""


def launch(front_end: FrontEnd, device, collective_timeout, **opts) -> int:
    try:
        ctx = init_distributed(device, collective_timeout)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        status = run(ctx, front_end, opts)
    except (StartupError, CheckpointError) as e:  # every rank has the same message: rank 0 says it
        if ctx.rank == 0:
            click.echo(f"Error: {e}", err=True)
        status = 1
    except RemoteAbort:  # rank 0 failed and says why itself
        status = 1
    except Exception as e:
        report_failure(ctx, e)
        raise LostRank from e
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return status


def run(ctx: DistContext, front_end: FrontEnd, opts: dict) -> int:
    args, tokenizer, error, sizing, num_blocks, host_blocks, disk_blocks = None, None, None, None, 0, 0, 0
    tp = TensorParallel(ctx.rank, ctx.world_size)
    ckpt_path, block_size, disk_path = opts["ckpt_path"], opts["block_size"], opts["kv_disk_path"]
    kernels.set_enabled(opts["cpu_kernels"])
    try:
        if block_size & (block_size - 1):
            raise ConfigError(f"--block-size {block_size}: must be a power of two")
        if opts["no_reuse"] and (disk_path or opts["kv_host_memory"]):
            raise ConfigError("--no-reuse keeps nothing: it cannot go with --kv-host-memory or --kv-disk-path")
        if disk_path:  # an unsafe folder is refused here, in one line, before the model loads
            with contextlib.suppress(OSError):  # one that cannot be created: DiskFiles says so, the job runs on
                check_folder(disk_path)
        args = model_args(ckpt_path, opts["config_path"], opts)
        sampling = SamplingParams(  # checked here: a value the sampler cannot take (NaN) is refused before loading
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            top_k=opts["top_k"],
            max_new_tokens=opts["max_new_tokens"],
            ignore_eos=opts["ignore_eos"],
        )
        compiled = opts["compile_decode"]
        torch_only = compiled or not opts["cpu_kernels"]
        backend_name = "torch" if opts["backend"] == "auto" and torch_only else opts["backend"]
        if backend_name == "cpu" and ctx.device.type != "cpu":
            raise ConfigError(f"--backend cpu runs on the CPU only, not on {ctx.device.type}: choose torch or auto")
        if backend_name == "cuda" and ctx.device.type != "cuda":
            raise ConfigError(f"--backend cuda runs on CUDA only, not on {ctx.device.type}: choose torch or auto")
        if compiled and backend_name == "cpu":
            raise ConfigError("--compile needs --backend torch: the cpu backend's C kernels cannot be held in a graph")
        if compiled and backend_name == "cuda":
            raise ConfigError(
                "--compile compiles the torch backend's step: the cuda backend's is captured by --cuda-graphs alone"
            )
        if opts["cuda_graphs"]:
            check_cuda_graphs(ctx.device, compiled, backend_name, args.dtype)
        layout = cache_layout(args, ctx.world_size)
        weights = functools.partial(weight_bytes, args, tp)
        num_blocks, sizing = size_pool(args, layout, opts["kv_cache_memory"], block_size, ctx.device, weights)
        host_blocks, disk_blocks, tiers_note = size_tiers(
            layout, ctx.world_size, block_size, num_blocks, opts["kv_host_memory"], disk_path, opts["kv_disk_size"]
        )
        if tiers_note:
            sizing += f"\n{tiers_note}"
        if ctx.rank == 0:
            tokenizer = load_tokenizer(ckpt_path, front_end.chat_required)
            front_end.check()
    except (ConfigError, TokenizerError, ValueError, OSError) as e:
        error = str(e)
    agree(error, ctx.world_size)
    num_blocks = min_over_ranks(num_blocks, ctx.world_size)  # free memory may differ between devices
    host_blocks = min_over_ranks(host_blocks, ctx.world_size)
    if num_blocks * block_size < args.max_seq_len:  # a conversation must fit the pool
        args = args.with_options(max_seq_len=num_blocks * block_size)
    backend = pick(backend_name, ctx.device.type, args.dtype)
    model = load_model(args, ckpt_path, tp, ctx.device, backend)
    note = backend.prepare()  # one-time work (the CPU kernels' build) now, not inside the first turn
    if ctx.rank == 0:
        click.echo(note, err=True)
    files = None
    if disk_path:
        made_by = fingerprint(args, ckpt_path, ctx.world_size, block_size)
        files = DiskFiles(disk_path, made_by, ctx.rank, shared=layout.replicated)
    held = compiled or opts["cuda_graphs"]  # decode steps held whole pad their rows into a spare block
    runner = ModelRunner(model, ctx, num_blocks, block_size, host_blocks, files, spare_blocks=int(held))
    report_memory(ctx, runner, sizing)
    if held:
        hold_decode(ctx, runner, args, compiled, opts["cuda_graphs"])
    if ctx.rank != 0:
        # rank 0 decides when to stop (a batch job at a step boundary) and then releases the followers
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        runner.follow()
        return 0
    on_disk = files.scan() if files else None
    if on_disk is not None:
        click.echo(f"disk tier {files.dir}: {len(on_disk)} blocks from earlier jobs", err=True)
    tiers = make_tiers(files.fingerprint if files else "", host_blocks, disk_blocks, on_disk)
    engine = Engine(
        runner,
        reuse=not opts["no_reuse"],
        max_num_batched_tokens=opts["max_num_batched_tokens"],
        policy=opts["schedule"].replace("-", "_"),
        manager=BlockManager(num_blocks, block_size, tiers),
    )
    sampling = replace(sampling, eos_token_ids=tokenizer.eos_token_ids if tokenizer else ())
    replies_file = files.dir / "replies.jsonl" if files else None
    replies = ReplyMemory.load(replies_file, vocab_size=args.vocab_size) if replies_file else ReplyMemory()
    try:
        status = front_end.run(engine, tokenizer, sampling, opts["seed"], replies)
    except BaseException as e:
        if not isinstance(e, CollectiveError):  # after a broken collective, an abort plan cannot get through
            with contextlib.suppress(Exception):
                runner.abort(f"rank 0 failed: {type(e).__name__}: {e}")
        raise
    if files is not None:
        before = files.saved
        planned = engine.flush()
        click.echo(f"disk tier: {files.saved - before} of {planned} blocks saved for later jobs", err=True)
        if files.writes and replies.replies:
            try:
                replies.save(replies_file)
            except OSError as e:
                click.echo(f"disk tier: cannot write {replies_file} ({e.strerror})", err=True)
    runner.shutdown()
    return status


def check_cuda_graphs(device: torch.device, compiled: bool, backend_name: str, dtype_name: str) -> None:
    """--cuda-graphs: on CUDA, over the torch backend's compiled step or the cuda backend's eager one (--backend auto
    picks it where Triton imports)."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, not {device.type}")
    backend = pick(backend_name, device.type, dtype_name).name
    if not compiled and backend != "cuda":
        raise ConfigError(
            f"--cuda-graphs alone captures the cuda backend's step, not {backend}'s: choose --backend cuda, or add "
            "--compile for the torch backend's"
        )


def hold_decode(ctx: DistContext, runner: ModelRunner, args: ModelArgs, compiled: bool, cuda_graphs: bool) -> None:
    """Compile (--compile) or capture (--cuda-graphs alone) the decode step's buckets on every rank; where any rank
    fails to, every rank runs eager, and rank 0 says why."""
    model, pool, rows = runner.model, runner.pool, args.max_batch_size
    if compiled:
        note = prepare_on_every_rank(
            ctx, runner, lambda: DecodeGraphs(model, pool, rows, cuda_graphs), "decode step not compiled"
        )
    else:
        note = prepare_on_every_rank(
            ctx,
            runner,
            lambda: CapturedDecode(model, pool, rows, args.max_seq_len, CudaGraphCapture(ctx.device)),
            "decode step not captured as CUDA graphs",
        )
    if ctx.rank == 0:
        click.echo(note, err=True)


def report_memory(ctx: DistContext, runner: ModelRunner, sizing: str) -> None:
    """Rank 0 logs every rank's weight and pool bytes, and what the pool holds."""
    usage = [measured_bytes(runner.model, runner.pool)]
    if ctx.world_size > 1:
        usage = [None] * ctx.world_size
        torch.distributed.all_gather_object(usage, measured_bytes(runner.model, runner.pool), group=control_group())
    if ctx.rank == 0:
        click.echo(sizing, err=True)
        for rank, (weights, cache) in enumerate(usage):
            click.echo(describe(rank, weights, cache, runner.pool), err=True)


def model_args(ckpt_path: str, config_path: str | None, opts: dict) -> ModelArgs:
    """The checkpoint's config with the runtime options given on the command line."""
    if not Path(ckpt_path).is_dir():
        raise ConfigError(f"--ckpt-path {ckpt_path}: no such folder")
    options = {k: opts[k] for k in ("attn_impl", "max_seq_len", "max_batch_size", "dtype", "kv_cache_dtype")}
    return load_config(config_path or Path(ckpt_path) / "config.json", **options)


def load_tokenizer(ckpt_path: str, required: bool) -> ChatTokenizer | None:
    if not (Path(ckpt_path) / "tokenizer.json").exists() and not required:
        return None  # raw token ids only
    tokenizer = ChatTokenizer(ckpt_path)
    if required and tokenizer.format is None:
        raise TokenizerError(f"{ckpt_path}/tokenizer_config.json has no chat_template: chat needs one")
    return tokenizer


def cli(command: click.Command = main) -> None:
    """Entry point. A bad option is the same mistake on every rank: rank 0 alone says so, every rank exits."""
    try:
        command.main(standalone_mode=False)
    except click.ClickException as e:
        if os.environ.get("RANK", "0") == "0":
            e.show()
        else:  # torchrun stops every rank as soon as one exits: let rank 0 say it first
            time.sleep(1.0)
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(1)


if __name__ == "__main__":
    cli()
