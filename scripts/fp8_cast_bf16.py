"""Turn an FP8 DeepSeek-V3 Hugging Face folder into a bf16 one, like DeepSeek's reference `fp8_cast_bf16.py`.

Why: hardware without fp8 support, and tools that expect plain bf16 weights. Every `X.weight` stored as
float8_e4m3fn is dequantised with `X.weight_scale_inv` (one fp32 scale per 128x128 block) to bfloat16 and the
scales are dropped; every other tensor is copied unchanged. Tensor names and shard file names stay the same,
`model.safetensors.index.json` loses its scale entries, `config.json` loses `quantization_config`, and every
other file (tokenizer, generation config, ...) is copied. One input shard is processed at a time, so peak
memory stays near the size of one output shard.
"""

import json
import shutil
from pathlib import Path

import click
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tp_infer.model import fp8

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"  # safetensors' name for torch.float8_e4m3fn
SKIPPED = {INDEX, CONFIG, ".cache"}  # rewritten here, or Hugging Face download bookkeeping about the input files


def weight_map(src: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index if there is one, else from the shards' headers."""
    if not src.is_dir():
        raise click.ClickException(f"input folder {src} does not exist")
    if (src / INDEX).exists():
        mapping: dict[str, str] = json.loads((src / INDEX).read_text())["weight_map"]
        for file in sorted(set(mapping.values())):
            if not (src / file).is_file():
                raise click.ClickException(f"{file} is named in {src / INDEX} but missing")
        return mapping
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise click.ClickException(f"{src} holds no safetensors files")
    mapping = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            mapping.update(dict.fromkeys(f.keys(), path.name))
    return mapping


def check_scales(src: Path, mapping: dict[str, str]) -> None:
    """Fail before writing anything if an fp8 tensor has no scale (reads shard headers only)."""
    for file in sorted(set(mapping.values())):
        with safe_open(src / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if f.get_slice(name).get_dtype() == FP8_DTYPE and name + SCALE_SUFFIX not in mapping:
                    raise click.ClickException(f"fp8 tensor {name} in {file} has no {name + SCALE_SUFFIX}")


def load_tensor(src: Path, mapping: dict[str, str], name: str) -> torch.Tensor:
    with safe_open(src / mapping[name], framework="pt") as f:
        return f.get_tensor(name)


def cast_shard(src: Path, mapping: dict[str, str], file: str) -> dict[str, torch.Tensor]:
    """The bf16 content of one output shard: fp8 weights dequantised, scales dropped, the rest unchanged."""
    out = {}
    with safe_open(src / file, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if name.endswith(SCALE_SUFFIX):
                continue
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.float8_e4m3fn:
                scale = load_tensor(src, mapping, name + SCALE_SUFFIX)
                tensor = fp8.dequantize(tensor, scale, torch.bfloat16)
            out[name] = tensor
    return out


def copy_other_files(src: Path, dst: Path) -> None:
    """Copy everything but the safetensors, the index and config.json (those are rewritten)."""
    for path in sorted(src.iterdir()):
        if path.name in SKIPPED or path.suffix == ".safetensors":
            continue
        if path.is_dir():
            shutil.copytree(path, dst / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dst / path.name)
    if (src / CONFIG).exists():
        config = json.loads((src / CONFIG).read_text())
        config.pop("quantization_config", None)
        (dst / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def cast_folder(src: Path, dst: Path) -> None:
    """Write the bf16 version of the FP8 Hugging Face folder `src` into `dst` (created; must hold no safetensors)."""
    mapping = weight_map(src)
    if dst.is_dir() and any(dst.glob("*.safetensors")):
        raise click.ClickException(f"output folder {dst} already holds safetensors files; not overwriting")
    check_scales(src, mapping)
    dst.mkdir(parents=True, exist_ok=True)
    new_map: dict[str, str] = {}
    total_size = total_params = 0
    for file in tqdm(sorted(set(mapping.values())), desc="shards", unit="shard"):
        tensors = cast_shard(src, mapping, file)
        if not tensors:  # a shard holding only scales
            continue
        save_file(tensors, dst / file, metadata={"format": "pt"})
        new_map.update(dict.fromkeys(tensors, file))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        total_params += sum(t.numel() for t in tensors.values())
        del tensors
    if (src / INDEX).exists():
        index = json.loads((src / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = total_size
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] = total_params
        index["weight_map"] = {name: new_map[name] for name in index["weight_map"] if name in new_map}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    copy_other_files(src, dst)


@click.command()
@click.option(
    "--input-fp8-hf-path",
    "src",
    required=True,
    type=click.Path(path_type=Path),
    help="Hugging Face folder with float8_e4m3fn weights and their *.weight_scale_inv block scales.",
)
@click.option(
    "--output-bf16-hf-path",
    "dst",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write the bf16 checkpoint to (created if needed; must not already hold safetensors).",
)
def main(src: Path, dst: Path) -> None:
    """Dequantise an FP8 DeepSeek-V3 checkpoint to bf16, keeping tensor and shard names."""
    cast_folder(src, dst)


if __name__ == "__main__":
    main()
