"""Convert a Hugging Face DeepSeek-V2/V3 checkpoint into tp_infer's per-rank shards.

python scripts/convert.py --hf-ckpt-path HF --save-path OUT --model-parallel N [--dtype bf16]
"""

import click

from tp_infer.checkpoint import CheckpointError
from tp_infer.config import ConfigError
from tp_infer.convert import convert


@click.command()
@click.option("--hf-ckpt-path", required=True, type=click.Path(file_okay=False), help="Hugging Face checkpoint folder.")
@click.option("--save-path", required=True, type=click.Path(file_okay=False), help="Folder for the converted shards.")
@click.option("--model-parallel", default=1, show_default=True, type=click.IntRange(min=1), help="Ranks to shard for.")
@click.option(
    "--dtype", type=click.Choice(["bf16"]), default=None, help="Dequantise FP8 weights to bf16 (default: keep)."
)
def main(hf_ckpt_path: str, save_path: str, model_parallel: int, dtype: str | None) -> None:
    """Write model{rank}-mp{N}.safetensors per rank plus config.json and tokenizer files, so SAVE_PATH alone runs."""
    try:
        convert(hf_ckpt_path, save_path, model_parallel, dtype)
    except (CheckpointError, ConfigError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
