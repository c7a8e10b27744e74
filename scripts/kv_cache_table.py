"""Print the KV-cache bytes per token of the published configs, per rank, as a Markdown table.

python scripts/kv_cache_table.py [--tp 1 --tp 8 --tp 16]
"""

from pathlib import Path

import click

from tp_infer.config import load_config
from tp_infer.model.attention import cache_layout

CONFIGS = {
    "16B": "config_16B.json",
    "236B": "config_236B.json",
    "671B": "config_671B.json",
    "671B V3.2": "config_v3.2.json",
}
MODES = [("naive", "bf16"), ("absorb", "bf16"), ("absorb", "fp8")]


def table(tp_sizes: list[int]) -> str:
    configs = Path(__file__).resolve().parent.parent / "configs"
    header = "| model | cache | " + " | ".join(f"TP {tp}" for tp in tp_sizes) + " |"
    lines = [header, "|" + "---|" * (2 + len(tp_sizes))]
    for name, file in CONFIGS.items():
        for impl, dtype in MODES:
            args = load_config(configs / file, attn_impl=impl, dtype="bf16", kv_cache_dtype=dtype)
            cells = [f"{cache_layout(args, tp).bytes_per_token / 1024:,.1f} KiB" for tp in tp_sizes]
            lines.append(f"| {name} | {impl} {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--tp", "tp_sizes", multiple=True, type=int, default=(1, 8, 16), show_default=True, help="World sizes.")
def main(tp_sizes: tuple[int, ...]) -> None:
    """KV-cache bytes per token of conversation on each rank, over all layers."""
    click.echo(table(list(tp_sizes)))


if __name__ == "__main__":
    main()
