"""Functions that run on every rank of a harness job (module level, so spawned processes can import them)."""

import torch

from tp_infer.checkpoint import load_model
from tp_infer.config import load_config
from tp_infer.model.layers import TensorParallel

PROMPT = [5, 17, 200, 3, 99, 42, 7, 7, 130, 250, 61, 8, 190, 33, 2, 77, 145, 12, 9, 240, 64, 101, 55, 18]
# long enough for the prefill paths of wide rows (attention.PAD_V_FROM new tokens and more)
LONG_PROMPT = [(7 * i * i + 13 * i + 5) % 250 + 2 for i in range(200)]


BLOCK = 16


def load(ctx, ckpt_dir, slots=4, max_seq_len=128, **options):
    """A runner whose pool holds `slots` conversations of max_seq_len tokens."""
    from tp_infer.engine.runner import ModelRunner

    options = {"dtype": "fp32", **options}
    args = load_config(f"{ckpt_dir}/config.json", max_seq_len=max_seq_len, max_batch_size=slots, **options)
    model = load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device)
    return ModelRunner(model, ctx, slots * max_seq_len // BLOCK, BLOCK)


def forward(runner, rows, all_logits=False):
    """Run rows of (slot, start position, token ids) on every rank, slot k owning the pool's blocks [k*M, (k+1)*M)
    (M blocks of max_seq_len); every rank gets the logits."""
    from tp_infer.engine.runner import StepPlan, build_batch

    per_slot = runner.model.args.max_seq_len // BLOCK
    plan = StepPlan.from_rows(
        [
            (list(range(slot * per_slot, slot * per_slot + -(-(start + len(ids)) // BLOCK))), start, ids)
            for slot, start, ids in rows
        ],
        all_logits=all_logits,
    )
    batch = build_batch(plan, BLOCK, runner.ctx.device)
    return runner.model(plan.tokens.to(runner.ctx.device), batch, runner.pool.layers, all_logits=all_logits)


def logits_suite(ctx, ckpt_dir):
    """For naive, absorb, and absorb with the cached latent expanded to per-head keys and values: prefill logits
    in one piece, in chunks (several tokens at start_pos > 0), token by token, greedy decode steps, and a ragged
    batch of rows at different positions."""
    out = {}
    n = len(PROMPT)

    def step(runner, toks, start, slot):
        return forward(runner, [(slot, start, toks)], all_logits=True)

    for impl in ("naive", "absorb", "absorb_expanded"):
        runner = load(ctx, ckpt_dir, attn_impl=impl.removesuffix("_expanded"))
        if impl == "absorb_expanded":  # every forward through the expanded form, which the FLOP count never picks here
            for layer in runner.model.layers:
                layer.attn.expanding_is_cheaper = lambda new_tokens, kv_len: True
        whole = step(runner, PROMPT, 0, 0)
        chunks = torch.cat([step(runner, PROMPT[a:b], a, 1) for a, b in ((0, 7), (7, 8), (8, 19), (19, n))])
        single = torch.cat([step(runner, PROMPT[i : i + 1], i, 2) for i in range(n)])
        decode, seq = [], list(PROMPT)
        last = whole[-1]
        for _ in range(6):
            seq.append(int(last.argmax()))
            last = forward(runner, [(0, len(seq) - 1, [seq[-1]])])[0]
            decode.append(last)
        # Slot 3 holds the prompt's first 10 tokens, slot 1 the whole prompt: one forward carries 6 new tokens
        # for slot 3 and 2 tokens for slot 1, at positions 10 and n.
        step(runner, PROMPT[:10], 0, 3)
        ragged = forward(runner, [(3, 10, PROMPT[10:16]), (1, n, [seq[n], seq[n + 1]])])
        out[impl] = {
            "whole": whole,
            "chunks": chunks,
            "single": single,
            "decode": torch.stack(decode),
            "ragged": ragged,
        }
    return out


def long_prefill_suite(ctx, ckpt_dir):
    """For naive and absorb: logits of LONG_PROMPT's every position fed in one piece over consecutive blocks (read
    in place, causal from position 0), in chunks of 40 + 160 (a wide row over a history, masked), and in one piece
    over scattered blocks (gathered)."""
    from tp_infer.engine.runner import StepPlan, build_batch

    out, n = {}, len(LONG_PROMPT)
    for impl in ("naive", "absorb"):
        runner = load(ctx, ckpt_dir, slots=2, max_seq_len=256, attn_impl=impl)
        blocks = -(-n // BLOCK)
        scattered = [2 * b + 1 for b in range(blocks)]  # odd blocks: none adjacent to the next
        plan = StepPlan.from_rows([(scattered, 0, LONG_PROMPT)], all_logits=True)
        batch = build_batch(plan, BLOCK, runner.ctx.device)
        out[impl] = {
            "whole": forward(runner, [(0, 0, LONG_PROMPT)], all_logits=True),
            "chunks": torch.cat(
                [forward(runner, [(1, a, LONG_PROMPT[a:b])], all_logits=True) for a, b in ((0, 40), (40, n))]
            ),
            "scattered": runner.model(plan.tokens.to(runner.ctx.device), batch, runner.pool.layers, all_logits=True),
            "first_blocks": [g.first_block for g in batch.groups],
        }
    return out


def greedy(ctx, ckpt_dir, prompt, new_tokens, attn_impl="absorb", dtype="fp32", max_seq_len=128, **options):
    """Prefill logits for every prompt position, and `new_tokens` greedy tokens decoded one by one."""
    runner = load(ctx, ckpt_dir, slots=1, max_seq_len=max_seq_len, attn_impl=attn_impl, dtype=dtype, **options)
    prefill = forward(runner, [(0, 0, prompt)], all_logits=True)
    seq, logits = list(prompt), prefill[-1]
    for _ in range(new_tokens):
        seq.append(int(logits.argmax()))
        logits = forward(runner, [(0, len(seq) - 1, [seq[-1]])])[0]
    return prefill, seq[len(prompt) :]


def greedy_with(ctx, ckpt_dir, prompt, new_tokens, options):
    """greedy() with load options given as one dict (run_ranks passes positional arguments only)."""
    return greedy(ctx, ckpt_dir, prompt, new_tokens, **options)


def serve(ctx, ckpt_dir, options, driver, *driver_args):
    """Load the model on every rank; rank 0 runs driver(engine, *driver_args) on an Engine and returns its
    result, the other ranks follow the plans until shutdown. options: load_config's, plus the engine's (reuse,
    max_num_batched_tokens, policy), the pool's (pool_tokens, default max_batch_size x max_seq_len) and the tiers'
    (host_tokens; disk_path and disk_tokens, whose files are flushed at the end as the command line does)."""
    from tp_infer.engine.engine import Engine
    from tp_infer.engine.runner import ModelRunner
    from tp_infer.kv.disk import DiskFiles, fingerprint
    from tp_infer.kv.manager import BlockManager
    from tp_infer.kv.tiers import make_tiers

    options = dict(options)
    engine_options = {k: options.pop(k) for k in ("reuse", "max_num_batched_tokens", "policy") if k in options}
    pool_tokens = options.pop("pool_tokens", None)
    host_blocks = options.pop("host_tokens", 0) // BLOCK
    disk_path, disk_blocks = options.pop("disk_path", None), options.pop("disk_tokens", 1 << 20) // BLOCK
    args = load_config(f"{ckpt_dir}/config.json", **{"dtype": "fp32", **options})
    model = load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device)
    files = None
    if disk_path is not None:
        made_by = fingerprint(args, ckpt_dir, ctx.world_size, BLOCK)
        files = DiskFiles(disk_path, made_by, ctx.rank, shared=args.attn_impl == "absorb")
    num_blocks = (pool_tokens or args.max_batch_size * args.max_seq_len) // BLOCK
    runner = ModelRunner(model, ctx, num_blocks, BLOCK, host_blocks, files)
    if ctx.rank != 0:
        runner.follow()
        return None
    tiers = make_tiers(files.fingerprint if files else "", host_blocks, disk_blocks, files.scan() if files else None)
    engine = Engine(runner, manager=BlockManager(num_blocks, BLOCK, tiers), **engine_options)
    try:
        out = driver(engine, *driver_args)
        if files is not None:
            engine.flush()
        return out
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
    """{(attn_impl, kv_cache_dtype): (measured KV-pool bytes, formula bytes)} on this rank."""
    from tp_infer.kv.memory import measured_bytes
    from tp_infer.model.attention import cache_layout

    out = {}
    for impl in ("naive", "absorb"):
        for kv in ("auto", "bf16", "fp8"):
            runner = load(ctx, ckpt_dir, attn_impl=impl, kv_cache_dtype=kv)
            tokens = runner.pool.num_blocks * runner.pool.block_size
            out[impl, kv] = (
                measured_bytes(runner.model, runner.pool)[1],
                cache_layout(runner.model.args, ctx.world_size).bytes_per_token * tokens,
            )
    return out


def compiled_decode(ctx, ckpt_dir):
    """Two conversations prefilled eager, then greedy decode steps of both rows (bucket 2) and of one row alone
    (bucket 1), run eager and through the compiled decode step (the torch backend): each step's logits from both."""
    from tp_infer.backends import reference
    from tp_infer.engine.graphs import DecodeGraphs
    from tp_infer.engine.runner import ModelRunner, StepPlan

    out = {}
    for compiled in (False, True):
        args = load_config(f"{ckpt_dir}/config.json", max_seq_len=128, max_batch_size=2, dtype="fp32")
        model = load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device, reference())
        runner = ModelRunner(model, ctx, 16, BLOCK, spare_blocks=1)
        if compiled:
            graphs = DecodeGraphs(model, runner.pool, max_rows=2)
            graphs.warm_up()
            runner.use_graphs(graphs)
        tables = [list(range(0, 8)), list(range(8, 16))]
        rows = [(0, PROMPT), (1, LONG_PROMPT[:40])]
        logits = runner.execute(StepPlan.from_rows([(tables[r], 0, ids) for r, ids in rows]))[0]
        lengths, steps = [len(PROMPT), 40], []
        for step in range(8):
            live = [0, 1] if step < 5 else [1]  # both rows, then row 1 alone
            nxt = logits.argmax(-1).tolist() if logits is not None else [0] * len(live)
            plan = StepPlan.from_rows([(tables[r], lengths[r], [nxt[i % len(nxt)]]) for i, r in enumerate(live)])
            logits = runner.execute(plan)[0]
            steps.append(logits)
            for r in live:
                lengths[r] += 1
        out[compiled] = steps
    return out
