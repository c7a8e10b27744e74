"""scripts/fp8_cast_bf16.py turns a tiny FP8 DeepSeek-V3 folder back into bf16, exactly as fp8.dequantize does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_fixtures import INDEX, make_bf16_checkpoint, make_fp8_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tp_infer.model import fp8

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fp8_cast_bf16.py"


def cast(src: Path, dst: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--input-fp8-hf-path", str(src), "--output-bf16-hf-path", str(dst)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bf16 = make_bf16_checkpoint(tmp_path_factory.mktemp("bf16"))
    (bf16 / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (bf16 / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    return make_fp8_checkpoint(bf16, tmp_path_factory.mktemp("fp8"))


def check_cast(src: Path, dst: Path) -> None:
    before, after = read_all(src), read_all(dst)
    scales = {n for n in before if n.endswith("_scale_inv")}
    assert scales and set(after) == set(before) - scales
    for name, tensor in after.items():
        if before[name].dtype == torch.float8_e4m3fn:
            expected = fp8.dequantize(before[name], before[name + "_scale_inv"], torch.bfloat16)
        else:
            expected = before[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {
        k: v for k, v in json.loads((src / "config.json").read_text()).items() if k != "quantization_config"
    }


def test_sharded_folder(fp8_dir: Path, tmp_path: Path) -> None:
    shards = sorted(p.name for p in fp8_dir.glob("*.safetensors"))
    assert len(shards) > 1
    result = cast(fp8_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    check_cast(fp8_dir, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards

    index = json.loads((out / INDEX).read_text())
    assert not any(n.endswith("_scale_inv") for n in index["weight_map"])
    for file in shards:  # every tensor is listed under the shard that holds it
        with safe_open(out / file, framework="pt") as f:
            assert all(index["weight_map"][n] == file for n in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert set(index["weight_map"]) == set(read_all(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_all(out).values())

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (fp8_dir / name).read_bytes(), name


def test_single_file(tmp_path: Path) -> None:
    bf16 = make_bf16_checkpoint(tmp_path / "bf16", max_shard_size="100MB")
    src = make_fp8_checkpoint(bf16, tmp_path / "fp8")
    assert [p.name for p in src.glob("*.safetensors")] == ["model.safetensors"] and not (src / INDEX).exists()
    result = cast(src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    check_cast(src, tmp_path / "out")
    assert not (tmp_path / "out" / INDEX).exists()


def test_missing_input_dir(tmp_path: Path) -> None:
    result = cast(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cast(tmp_path / "empty", tmp_path / "out")
    assert result.returncode != 0 and "no safetensors" in result.stderr


def test_missing_scale(fp8_dir: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_dir, tmp_path / "fp8"))
    index = json.loads((src / INDEX).read_text())
    scale = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
    file = index["weight_map"].pop(scale)
    tensors = load_file(src / file)
    del tensors[scale]
    save_file(tensors, src / file, metadata={"format": "pt"})
    (src / INDEX).write_text(json.dumps(index))
    result = cast(src, tmp_path / "out")
    assert result.returncode != 0 and "model.layers.1.mlp.experts.2.up_proj.weight" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_missing_shard(fp8_dir: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_dir, tmp_path / "fp8"))
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    result = cast(src, tmp_path / "out")
    assert result.returncode != 0 and victim.name in result.stderr


def test_refuses_to_overwrite(fp8_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    result = cast(fp8_dir, out)
    assert result.returncode != 0 and str(out) in result.stderr
    assert (out / "model.safetensors").read_bytes() == b"keep me"
