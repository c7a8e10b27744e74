"""Functions that run on every rank of a harness job (module level, so spawned processes can import them)."""

import torch

from tp_infer.checkpoint import load_model
from tp_infer.config import load_config
from tp_infer.model.layers import TensorParallel

PROMPT = [5, 17, 200, 3, 99, 42, 7, 7, 130, 250, 61, 8, 190, 33, 2, 77, 145, 12, 9, 240, 64, 101, 55, 18]


def load(ctx, ckpt_dir, **options):
    args = load_config(f"{ckpt_dir}/config.json", dtype="fp32", max_seq_len=128, max_batch_size=4, **options)
    return load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device)


def logits_suite(ctx, ckpt_dir):
    """For naive, absorb, and absorb with the cached latent expanded to per-head keys and values: prefill logits
    in one piece, in chunks (several tokens at start_pos > 0), token by token, greedy decode steps, and a ragged
    batch of rows at different positions."""
    out = {}
    tokens = torch.tensor([PROMPT])
    n = len(PROMPT)

    def step(model, toks, start, slot):
        return model(torch.tensor([toks]), torch.tensor([start]), torch.tensor([slot]), last_only=False)[0]

    for impl in ("naive", "absorb", "absorb_expanded"):
        model = load(ctx, ckpt_dir, attn_impl=impl.removesuffix("_expanded"))
        if impl == "absorb_expanded":  # every forward through the expanded form, which the FLOP count never picks here
            for layer in model.layers:
                layer.attn.expanding_is_cheaper = lambda new_tokens, kv_len: True
        whole = model(tokens, torch.tensor([0]), torch.tensor([0]), last_only=False)[0]
        chunks = torch.cat([step(model, PROMPT[a:b], a, 1) for a, b in ((0, 7), (7, 8), (8, 19), (19, n))])
        single = torch.cat([step(model, PROMPT[i : i + 1], i, 2) for i in range(n)])
        decode, seq = [], list(PROMPT)
        last = whole[-1]
        for _ in range(6):
            seq.append(int(last.argmax()))
            last = model(torch.tensor([[seq[-1]]]), torch.tensor([len(seq) - 1]), torch.tensor([0]))[0]
            decode.append(last)
        # Slot 3 holds the prompt's first 10 tokens, slot 1 the whole prompt: one forward carries 6 new tokens
        # for slot 3 and 2 padded-to-6 tokens for slot 1, at positions 10 and n.
        step(model, PROMPT[:10], 0, 3)
        ragged = model(
            torch.tensor([PROMPT[10:16], [seq[n], seq[n + 1], 0, 0, 0, 0]]),
            torch.tensor([10, n]),
            torch.tensor([3, 1]),
            torch.tensor([6, 2]),
        )
        out[impl] = {
            "whole": whole,
            "chunks": chunks,
            "single": single,
            "decode": torch.stack(decode),
            "ragged": ragged,
        }
    return out


def greedy(ctx, ckpt_dir, prompt, new_tokens, attn_impl="absorb", dtype="fp32"):
    """Prefill logits for every prompt position, and `new_tokens` greedy tokens decoded one by one."""
    args = load_config(f"{ckpt_dir}/config.json", dtype=dtype, max_seq_len=128, max_batch_size=1, attn_impl=attn_impl)
    model = load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device)
    prefill = model(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]), last_only=False)[0]
    seq, logits = list(prompt), prefill[-1]
    for _ in range(new_tokens):
        seq.append(int(logits.argmax()))
        logits = model(torch.tensor([[seq[-1]]]), torch.tensor([len(seq) - 1]), torch.tensor([0]))[0]
    return prefill, seq[len(prompt) :]


def serve(ctx, ckpt_dir, options, driver, *driver_args):
    """Load the model on every rank; rank 0 runs driver(engine, *driver_args) on an Engine and returns its
    result, the other ranks follow the plans until shutdown."""
    from tp_infer.engine.engine import Engine
    from tp_infer.engine.runner import ModelRunner

    options = dict(options)
    reuse = options.pop("reuse", True)
    prefill_chunk = options.pop("prefill_chunk", 2048)
    args = load_config(f"{ckpt_dir}/config.json", **{"dtype": "fp32", **options})
    model = load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device)
    runner = ModelRunner(model, ctx)
    if ctx.rank != 0:
        runner.follow()
        return None
    try:
        return driver(Engine(runner, reuse=reuse, prefill_chunk=prefill_chunk), *driver_args)
    finally:
        runner.shutdown()


def load_errors(ctx, ckpt_dirs):
    """Try to load each folder in turn; per folder, the message the load raised (None when it loaded). Loading
    is collective, so every rank learns of every rank's failure and goes on to the next folder in step."""
    from tp_infer.checkpoint import CheckpointError
    from tp_infer.config import ConfigError

    out = []
    for ckpt_dir in ckpt_dirs:
        try:
            load(ctx, ckpt_dir)
            out.append(None)
        except (CheckpointError, ConfigError) as e:
            out.append(str(e))
    return out


def cache_bytes(ctx, ckpt_dir):
    """{(attn_impl, kv_cache_dtype): (measured KV-cache bytes, formula bytes)} on this rank."""
    from tp_infer.kv.memory import kv_bytes_per_token, measured_bytes

    out = {}
    for impl in ("naive", "absorb"):
        for kv in ("auto", "bf16", "fp8"):
            model = load(ctx, ckpt_dir, attn_impl=impl, kv_cache_dtype=kv)
            args = model.args
            formula = kv_bytes_per_token(args, ctx.world_size) * args.max_batch_size * args.max_seq_len
            out[impl, kv] = (measured_bytes(model)[1], formula)
    return out
