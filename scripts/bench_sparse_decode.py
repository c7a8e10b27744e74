"""Decode speed of DeepSeek-V3.2's sparse attention against V3's dense attention at the same widths, over histories
several times the indexer's top-k, measured side by side in one run.

python scripts/bench_sparse_decode.py [--v3 configs/config_bench.json] [--v32 configs/config_bench_v3.2.json]
    [--history 2048 --history 4000 --history 8000] [--tokens 32] [--rounds 3] [--dtype fp32] [--device cpu|cuda]
    [--threads N]

Both models get random weights (scaled as the tests' checkpoints) and one conversation of --history random tokens,
prefilled once; then each round decodes --tokens greedy tokens on each model in turn (V3, then V3.2), from the same
history each time (the decoded tokens' cache entries are overwritten by the next round's). It prints the median
tokens/s per model and history, and the ratio V3.2 / V3 (above 1: sparse attention is faster). V3.2's decode reads,
per layer and row, every cached indexer key (index_head_dim values a position) to choose index_topk positions, then
attends over those only; V3's attends over the whole history.
"""

import statistics
import time

import click
import torch
from bench_common import device_option, dtype_option, fill_random, threads_option

from tp_infer.config import load_config
from tp_infer.engine.runner import StepPlan, build_batch
from tp_infer.kv.pool import KVPool
from tp_infer.model.attention import cache_layout
from tp_infer.model.transformer import Transformer

BLOCK = 16


class Decoder:
    """A random model of a config with one conversation's history prefilled, decoding from its end."""

    def __init__(self, config: str, dtype: str, device: torch.device, history: list[int], seed: int = 0):
        self.args = load_config(config, dtype=dtype, max_batch_size=1, max_seq_len=len(history) + 1024)
        with torch.device(device):
            self.model = Transformer(self.args)
        fill_random(self.model, seed)
        self.model.eval()
        self.device = device
        blocks = self.args.max_seq_len // BLOCK
        self.pool = KVPool.of(cache_layout(self.args, 1), blocks, BLOCK, device)
        self.table = list(range(blocks))
        self.start = len(history)
        for begin in range(0, len(history), 512):  # prefilled in chunks, as the engine would
            self.forward(begin, history[begin : begin + 512])

    def forward(self, start: int, ids: list[int]) -> torch.Tensor:
        step = StepPlan.from_rows([(self.table[: -(-(start + len(ids)) // BLOCK)], start, ids)])
        batch = build_batch(step, BLOCK, self.device)
        return self.model(step.tokens.to(self.device), batch, self.pool.layers)

    def decode(self, tokens: int) -> float:
        """Greedy decode of `tokens` tokens after the history; tokens/s, timed after the last token is read back."""
        token, begin = 1, time.perf_counter()
        for i in range(tokens):
            token = int(self.forward(self.start + i, [token]).argmax())
        return tokens / (time.perf_counter() - begin)


@click.command()
@click.option("--v3", "v3_config", default="configs/config_bench.json", show_default=True, help="The dense model.")
@click.option("--v32", "v32_config", default="configs/config_bench_v3.2.json", show_default=True, help="The sparse.")
@click.option("--history", "histories", multiple=True, type=int, default=(2048, 4000, 8000), show_default=True)
@click.option("--tokens", default=32, show_default=True, help="Tokens decoded per round and model.")
@click.option("--rounds", default=3, show_default=True)
@dtype_option()
@device_option()
@threads_option()
def main(v3_config, v32_config, histories, tokens, rounds, dtype, device, threads) -> None:
    """V3.2's sparse decode against V3's dense decode, tokens/s side by side."""
    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{dtype}, {device}, {torch.get_num_threads()} threads; {v3_config} against {v32_config}")
    print("| history | V3 tokens/s | V3.2 tokens/s | V3.2 / V3 |")
    print("|---:|---:|---:|---:|")
    for length in histories:
        history = torch.randint(2, 30000, (length,), generator=generator).tolist()
        dense = Decoder(v3_config, dtype, device, history)
        sparse = Decoder(v32_config, dtype, device, history)
        assert sparse.model.args.index_topk < length, "the history should be longer than the indexer's top-k"
        speeds = {"dense": [], "sparse": []}
        for _ in range(rounds):
            speeds["dense"].append(dense.decode(tokens))
            speeds["sparse"].append(sparse.decode(tokens))
        v3, v32 = (statistics.median(speeds[name]) for name in ("dense", "sparse"))
        print(f"| {length:,} | {v3:.1f} | {v32:.1f} | {v32 / v3:.2f} |", flush=True)
        del dense, sparse


if __name__ == "__main__":
    main()
