"""Hugging Face DeepSeek folder -> one safetensors shard per rank in the reference layout, streamed tensor by
tensor: each rank's slices are read with safetensors' lazy slicing, so peak memory stays near one output shard."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import click
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tp_infer.checkpoint import CheckpointError, expected_shapes, layer_index, ref_name, shard_name
from tp_infer.config import ConfigError, load_config
from tp_infer.model import fp8
from tp_infer.model.layers import TensorParallel

INDEX = "model.safetensors.index.json"


def source_tensors(hf_dir: Path, n_layers: int) -> dict[str, tuple[Path, str]]:
    """Reference name -> (file, Hugging Face name) for every tensor inference uses (the MTP layers are skipped)."""
    index = hf_dir / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{hf_dir} holds no safetensors files and no {INDEX}")
        weight_map = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
    sources = {}
    for hf_name, file_name in weight_map.items():
        layer = layer_index(hf_name)
        if (layer is not None and layer >= n_layers) or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        path = hf_dir / file_name
        if not path.exists():
            raise CheckpointError(f"{file_name}, listed in {INDEX} for {hf_name}, is missing")
        sources[ref_name(hf_name)] = (path, hf_name)
    return sources


def check_complete(sources: dict, full: dict, hf_dir: Path) -> None:
    missing = sorted(set(full) - set(sources))
    if missing:
        raise CheckpointError(f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(set(sources) - set(full))
    if extra:
        path, hf_name = sources[extra[0]]
        raise CheckpointError(f"{path.name}: unexpected tensor {hf_name} (the config does not describe it)")


def check_fp8_blocks(sources: dict, full: dict, shard: dict) -> None:
    """A split FP8 weight keeps its scales only if every shard holds whole 128x128 blocks (or the tensor is one
    block wide along the split): else a rank's rows of the scale grid would not be the blocks its weights sit in."""
    for name, (shape, _) in shard.items():
        scale = name.removesuffix("weight") + "scale"
        if scale not in shard:
            continue
        for dim, (whole, part) in enumerate(zip(full[name][0], shape, strict=True)):
            if whole != part and part % fp8.BLOCK and full[scale][0][dim] > 1:
                raise CheckpointError(
                    f"tensor {sources[name][1]}: shards of {part} of its {whole} {('rows', 'columns')[dim]} cut "
                    "through its FP8 128x128 scale blocks; convert with --dtype bf16 (or another --model-parallel)"
                )


def open_slice(f, hf_name: str, full_shape: tuple):
    """A lazy view of a source tensor whose presence and shape are checked (reads only the file header)."""
    try:
        src = f.get_slice(hf_name)
    except SafetensorError:
        raise CheckpointError(f"tensor {hf_name} is missing from the file {INDEX} lists it in") from None
    if tuple(src.get_shape()) != tuple(full_shape):
        raise CheckpointError(
            f"tensor {hf_name} has shape {tuple(src.get_shape())}, the config implies {tuple(full_shape)}"
        )
    return src


def check_shapes(sources: dict, full: dict) -> None:
    """Every source tensor present with the shape the config implies, checked before anything is written."""
    by_file: dict[Path, list[str]] = {}
    for name, (path, _) in sources.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                open_slice(f, sources[name][1], full[name][0])


def read_slice(f, hf_name: str, full_shape: tuple, shard_shape: tuple, rank: int) -> torch.Tensor:
    """This rank's part of a tensor: whole when the shapes agree, else the rank-th chunk of the one split dim."""
    src = open_slice(f, hf_name, full_shape)
    if tuple(full_shape) == tuple(shard_shape):
        return src[:]
    (dim,) = [d for d, (a, b) in enumerate(zip(full_shape, shard_shape, strict=True)) if a != b]
    if full_shape[dim] % shard_shape[dim]:
        raise CheckpointError(
            f"tensor {hf_name}: {full_shape[dim]} rows do not split into shards of {shard_shape[dim]} "
            "(FP8 128x128 scale blocks must align with the shard boundaries; convert with --dtype bf16)"
        )
    index = [slice(None)] * len(full_shape)
    index[dim] = slice(rank * shard_shape[dim], (rank + 1) * shard_shape[dim])
    return src[tuple(index)]


def convert(hf_dir: str | Path, save_dir: str | Path, model_parallel: int, dtype: str | None = None) -> None:
    """Write model{r}-mp{N}.safetensors for every rank, config.json and the tokenizer files into save_dir.
    dtype "bf16" dequantises FP8 weights (scales dropped); None keeps the checkpoint's own formats."""
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    if not (hf_dir / "config.json").exists():
        raise CheckpointError(f"{hf_dir / 'config.json'} is missing")
    if dtype not in (None, "bf16"):
        raise CheckpointError(f"--dtype {dtype!r}: only bf16 (dequantise FP8) is supported")
    config = json.loads((hf_dir / "config.json").read_text())
    src_args = load_config(hf_dir / "config.json")
    dequant = dtype == "bf16" and src_args.fp8_weights
    dst_args = replace(src_args, fp8_weights=src_args.fp8_weights and not dequant)
    dst_args.check_world_size(model_parallel)
    sources = source_tensors(hf_dir, src_args.n_layers)
    full = expected_shapes(src_args, TensorParallel())
    check_complete(sources, full, hf_dir)
    check_shapes(sources, full)
    check_fp8_blocks(sources, full, expected_shapes(dst_args, TensorParallel(0, model_parallel)))

    save_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(model_parallel):
        shard = expected_shapes(dst_args, TensorParallel(rank, model_parallel))
        state = {}
        for name, (shape, _) in tqdm(shard.items(), desc=f"rank {rank}/{model_parallel}", unit="tensor"):
            if dequant and name[: -len("weight")] + "scale" in sources:
                state[name] = dequantized_slice(sources, name, full, shape, rank)
                continue
            path, hf_name = sources[name]
            with safe_open(path, framework="pt") as f:
                state[name] = read_slice(f, hf_name, full[name][0], shape, rank).contiguous()
        save_file(
            state, save_dir / shard_name(rank, model_parallel), {"world_size": str(model_parallel), "rank": str(rank)}
        )
        del state

    if dequant:
        config.pop("quantization_config", None)
    (save_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in hf_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX):
            shutil.copy2(extra, save_dir / extra.name)


def dequantized_slice(sources: dict, name: str, full: dict, shard_shape: tuple, rank: int) -> torch.Tensor:
    """Dequantise a whole FP8 weight to bf16 (one tensor in memory at a time), then take this rank's part."""
    scale_name = name[: -len("weight")] + "scale"
    tensors = []
    for ref in (name, scale_name):
        path, hf_name = sources[ref]
        with safe_open(path, framework="pt") as f:
            tensors.append(read_slice(f, hf_name, full[ref][0], full[ref][0], 0))
    weight = fp8.dequantize(*tensors, torch.bfloat16)
    if weight.shape == shard_shape:
        return weight
    (dim,) = [d for d, (a, b) in enumerate(zip(weight.shape, shard_shape, strict=True)) if a != b]
    return weight.narrow(dim, rank * shard_shape[dim], shard_shape[dim]).contiguous()


@click.command()
@click.option("--hf-ckpt-path", required=True, type=click.Path(file_okay=False), help="Hugging Face checkpoint folder.")
@click.option("--save-path", required=True, type=click.Path(file_okay=False), help="Folder for the converted shards.")
@click.option("--model-parallel", default=1, show_default=True, type=click.IntRange(min=1), help="Ranks to shard for.")
@click.option(
    "--dtype", type=click.Choice(["bf16"]), default=None, help="Dequantise FP8 weights to bf16 (default: keep)."
)
def cli(hf_ckpt_path: str, save_path: str, model_parallel: int, dtype: str | None) -> None:
    """Write model{rank}-mp{N}.safetensors per rank plus config.json and tokenizer files, so SAVE_PATH alone runs."""
    try:
        convert(hf_ckpt_path, save_path, model_parallel, dtype)
    except (CheckpointError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
