"""Convert a Hugging Face DeepSeek-V2/V3/V3.2 checkpoint into tp_infer's per-rank shards: the same command as the
tp-infer-convert console script (tp_infer.convert.cli), runnable from a checkout.

python scripts/convert.py --hf-ckpt-path HF --save-path OUT --model-parallel N [--dtype bf16]
"""

from tp_infer.convert import cli

if __name__ == "__main__":
    cli()
