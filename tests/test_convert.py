"""Hugging Face folder -> per-rank shards: FP8 kept or dequantised, the MTP layer skipped, the output folder
self-sufficient, and every bad checkpoint (to convert or to load) refused with the culprit named, on every rank."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rank_fns
import torch
from checkpoints import scale_weights
from fp8_fixtures import INDEX, make_fp8_checkpoint, tiny_config
from harness import RankError, run_ranks
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tp_infer.checkpoint import CheckpointError, expected_shapes, load_model, ref_name, shard_name
from tp_infer.config import load_config
from tp_infer.convert import convert
from tp_infer.distributed import DistContext
from tp_infer.model import fp8
from tp_infer.model.layers import TensorParallel

ROOT = Path(__file__).resolve().parents[1]
WS1 = DistContext(0, 1, torch.device("cpu"))  # world size 1 needs no process group: run in this process

# Every dimension split across 2 ranks is a multiple of 128 per rank, so FP8 scale blocks align with the shards:
# wq_b 4*(64+64)=512 and wkv_b 4*(64+64)=512 rows, wo 4*64=256 columns, dense 256, shared experts 2*128=256.
# At world size 4 the same splits give 64 per rank, which the FP8 blocks do not allow.
ALIGNED = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    n_shared_experts=2,
    n_routed_experts=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
)


# ---------------------------------------------------------------------------------------------------- helpers


def cli(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/convert.py", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_cli_error(result: subprocess.CompletedProcess, *needles: str, progress: bool = False) -> str:
    """A non-zero exit, no traceback, and stderr a single `Error: ...` line naming every needle (after the
    progress bars of the shards already written, when `progress`)."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    if not progress:
        assert len(lines) == 1, result.stderr
    error = lines[-1]
    assert error.startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1, result.stderr
    for needle in needles:
        assert needle in error, error
    return error


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a Hugging Face folder, by Hugging Face name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()  # noqa: SIM118


def rewrite(path: Path, edit) -> None:
    """Apply edit(tensors) to a safetensors file in place, keeping its metadata."""
    tensors, meta = read_shard(path)
    edit(tensors)
    save_file(tensors, path, meta)


def copy_ckpt(src: Path, dst: Path, *world_sizes: int) -> Path:
    """config.json and the shards of the given world sizes (not the session fixture itself: tests corrupt it)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    for ws in world_sizes:
        for rank in range(ws):
            shutil.copy2(src / shard_name(rank, ws), dst / shard_name(rank, ws))
    return dst


def rank_part(full: torch.Tensor, shape: torch.Size, rank: int) -> torch.Tensor:
    """The rank-th chunk of `full` along the one dimension where `shape` is smaller (all of it if none is)."""
    if full.shape == shape:
        return full
    (dim,) = [d for d in range(full.dim()) if full.shape[d] != shape[d]]
    return full.narrow(dim, rank * shape[dim], shape[dim])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, FP8 included (torch.equal has no float8 kernel on every build)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def prefill(ckpt_dir: Path) -> torch.Tensor:
    """fp32 logits for every position of the prompt, at world size 1 in this process."""
    return rank_fns.greedy(WS1, str(ckpt_dir), rank_fns.PROMPT, 0)[0]


def write_bf16(path: Path, seed: int = 0, **overrides: object) -> Path:
    """A tiny bf16 DeepSeek-V3 folder (several safetensors files and an index) with weights scaled, as in
    checkpoints.py, so that activations and logits are O(1) and the router's choices are decisive."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(tiny_config(**overrides))
    scale_weights(model)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="300KB")
    return path


# ---------------------------------------------------------------------------------------------------- FP8


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory) -> dict[str, Path]:
    """The aligned tiny V3 in bf16 ("bf16") and its FP8 twin ("fp8", one scale stored in another file), with
    the bf16 one converted at world size 1 ("ref") and the FP8 one converted keeping FP8 at 1 and 2 ("out")."""
    root = tmp_path_factory.mktemp("fp8")
    bf16 = write_bf16(root / "bf16", **ALIGNED)
    src = make_fp8_checkpoint(bf16, root / "hf_fp8")
    assert len(list(src.glob("*.safetensors"))) > 1 and (src / INDEX).exists()
    convert(bf16, root / "ref", 1)
    for ws in (1, 2):
        convert(src, root / "out", ws)
    return {"bf16": bf16, "fp8": src, "ref": root / "ref", "out": root / "out"}


@pytest.mark.parametrize("world_size", [1, 2])
def test_fp8_shards_keep_e4m3_weights_and_scales(fp8_ckpt, world_size):
    """Each shard holds the Hugging Face FP8 bytes and fp32 scales, cut at the 128-aligned rank boundaries."""
    hf = {ref_name(name): t for name, t in read_folder(fp8_ckpt["fp8"]).items()}
    args = load_config(fp8_ckpt["out"] / "config.json")
    assert args.fp8_weights
    n_fp8 = 0
    for rank in range(world_size):
        tensors, meta = read_shard(fp8_ckpt["out"] / shard_name(rank, world_size))
        assert meta["world_size"] == str(world_size) and meta["rank"] == str(rank)
        expected = expected_shapes(args, TensorParallel(rank, world_size))
        assert set(tensors) == set(expected)
        for name, tensor in tensors.items():
            assert tensor.shape == expected[name][0], name
            assert same(tensor, rank_part(hf[name], tensor.shape, rank)), name
            if tensor.dtype == torch.float8_e4m3fn:
                n_fp8 += 1
                scale = tensors[name.removesuffix("weight") + "scale"]
                assert scale.dtype == torch.float32
                assert scale.shape == fp8.scale_shape(*tensor.shape), name
        assert tensors["embed.weight"].dtype == tensors["head.weight"].dtype == torch.bfloat16
    assert n_fp8 > 20


def test_fp8_logits_close_to_unquantised(fp8_ckpt):
    """FP8 weights (dequantised at run time, fp32 compute) against the same model before quantisation.

    e4m3 keeps 3 mantissa bits: rounding moves each weight by at most 1/16 of its value (~6%), 2.6% RMS for these
    Gaussian weights, and a matmul's output by the same 2.6% RMS (independent errors neither cancel nor add up
    along a dot product). The longest path through the two layers chains about eight quantised matmuls (wq_a,
    wq_b, wkv_a, wkv_b, wo, w1/w3, w2, ...) whose errors add in quadrature: sqrt(8) * 2.6% ~ 7% of the logits'
    norm, which is what is measured (7.3%). Bounds: 10% in norm, and 25% of the largest |logit| for the worst
    single logit (measured 18.6%). Weights read without their scale are off by orders of magnitude; a wrong
    block's scale is caught bit for bit by test_fp8_shards_keep_e4m3_weights_and_scales.
    """
    quantised, reference = prefill(fp8_ckpt["out"]), prefill(fp8_ckpt["ref"])
    diff = (quantised - reference).abs()
    rel = (diff.norm() / reference.norm()).item()
    rel_max = (diff.max() / reference.abs().max()).item()
    print(
        f"FP8 vs unquantised logits: max |diff| {diff.max().item():.4f} (logits std {reference.std().item():.3f}, "
        f"max |logit| {reference.abs().max().item():.3f}), relative {rel:.4f} (norm) / {rel_max:.4f} (max)"
    )
    assert reference.std() > 0.3, "degenerate logits would prove little"
    assert rel <= 0.1 and rel_max <= 0.25
    assert rel > 1e-4, "the FP8 weights should not be the unquantised ones"
    # the argmax survives quantisation nearly everywhere
    agree = (quantised.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"FP8 vs unquantised: argmax agrees at {agree:.0%} of positions")
    assert agree >= 0.75


def test_fp8_matches_transformers_on_dequantised_weights(fp8_ckpt, tmp_path):
    """Quantisation is the only error: transformers in fp32 on fp8.dequantize(w, s) gives the FP8 model's logits."""
    from transformers import DeepseekV3ForCausalLM

    hf = read_folder(fp8_ckpt["fp8"])
    state = {
        name: fp8.dequantize(t, hf[name + "_scale_inv"], torch.float32) if t.dtype == torch.float8_e4m3fn else t.float()
        for name, t in hf.items()
        if not name.endswith("_scale_inv")
    }
    tmp_path.joinpath("config.json").write_bytes((fp8_ckpt["bf16"] / "config.json").read_bytes())
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([rank_fns.PROMPT])).logits[0]
    diff = (prefill(fp8_ckpt["out"]) - reference).abs().max().item()
    print(f"FP8 (ours) vs transformers on dequantised weights: max |diff| {diff:.2e}")
    assert diff <= 1e-4


def test_fp8_world_size_2_matches_1(fp8_ckpt):
    logits1, tokens1 = rank_fns.greedy(WS1, str(fp8_ckpt["out"]), rank_fns.PROMPT, 6)
    results = run_ranks(2, rank_fns.greedy, str(fp8_ckpt["out"]), rank_fns.PROMPT, 6)
    for logits2, tokens2 in results:
        diff = (logits2 - logits1).abs().max().item()
        print(f"FP8 ws2 vs ws1: max |diff| {diff:.2e}")
        assert diff <= 1e-5
        assert tokens2 == tokens1


def test_fp8_to_bf16_is_exact_dequantisation(fp8_ckpt, tmp_path):
    """--dtype bf16 (here at world size 4, where FP8 shards could not be cut) writes fp8.dequantize(w, s, bf16)
    sliced per rank, no scales, and a config.json without quantization_config."""
    hf = {ref_name(name): t for name, t in read_folder(fp8_ckpt["fp8"]).items()}
    convert(fp8_ckpt["fp8"], tmp_path, 4, "bf16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    source = json.loads((fp8_ckpt["fp8"] / "config.json").read_text())
    assert config == {k: v for k, v in source.items() if k != "quantization_config"}
    args = load_config(tmp_path / "config.json")
    assert not args.fp8_weights
    n_dequantised = 0
    for rank in range(4):
        tensors, _ = read_shard(tmp_path / shard_name(rank, 4))
        assert set(tensors) == set(expected_shapes(args, TensorParallel(rank, 4)))
        for name, tensor in tensors.items():
            full = hf[name]
            if full.dtype == torch.float8_e4m3fn:
                full = fp8.dequantize(full, hf[name.removesuffix("weight") + "scale"], torch.bfloat16)
                n_dequantised += 1
            assert tensor.dtype == torch.bfloat16, name
            assert same(tensor, rank_part(full, tensor.shape, rank)), name
    assert n_dequantised > 20


def test_fp8_to_bf16_runs(fp8_ckpt, tmp_path):
    """A --dtype bf16 conversion loads and gives nearly the FP8 model's logits (only bf16 rounding differs)."""
    convert(fp8_ckpt["fp8"], tmp_path, 1, "bf16")
    dequantised, quantised = prefill(tmp_path), prefill(fp8_ckpt["out"])
    rel = ((dequantised - quantised).norm() / quantised.norm()).item()
    print(f"bf16-dequantised vs FP8 logits: relative {rel:.4f} (norm)")
    assert rel <= 0.02  # bf16 keeps 8 bits: ~0.2% per weight


def test_fp8_misaligned_shards_are_refused(fp8_ckpt, tmp_path):
    """Shards cut inside a 128x128 scale block cannot keep FP8. At world size 4 the aligned model's splits are 64
    wide: the scale grid (2 blocks) still splits over 4 ranks, which must not pass for a valid cut."""
    with pytest.raises(CheckpointError, match="--dtype bf16") as e:
        convert(fp8_ckpt["fp8"], tmp_path / "out", 4)
    print(e.value)
    assert not list((tmp_path / "out").glob("*.safetensors"))
    # the same through the CLI
    result = cli("--hf-ckpt-path", fp8_ckpt["fp8"], "--save-path", tmp_path / "cli", "--model-parallel", 4)
    assert_cli_error(result, "--dtype bf16")


def test_fp8_partial_block_shards_are_refused(tmp_path):
    """fp8_fixtures' default config: intermediate 320 splits into 160-row shards, 1.25 scale blocks each."""
    src = make_fp8_checkpoint(write_bf16(tmp_path / "bf16"), tmp_path / "fp8")
    with pytest.raises(CheckpointError, match="--dtype bf16"):
        convert(src, tmp_path / "out", 2)
    convert(src, tmp_path / "ok", 2, "bf16")  # the fallback the message suggests
    convert(src, tmp_path / "ok", 1)  # one rank cuts nothing
    assert len(list((tmp_path / "ok").glob("*.safetensors"))) == 3


# ---------------------------------------------------------------------------------------------------- MTP layer


MTP_TENSORS = {  # DeepSeek-V3's multi-token-prediction module is layer num_hidden_layers (3 here)
    "model.layers.3.eh_proj.weight": (64, 128),
    "model.layers.3.enorm.weight": (64,),
    "model.layers.3.hnorm.weight": (64,),
    "model.layers.3.embed_tokens.weight": (256, 64),
    "model.layers.3.shared_head.norm.weight": (64,),
    "model.layers.3.shared_head.head.weight": (256, 64),
    "model.layers.3.self_attn.q_a_proj.weight": (48, 64),
    "model.layers.3.input_layernorm.weight": (64,),
    "model.layers.3.mlp.experts.0.gate_proj.weight": (32, 64),
}


@pytest.mark.parametrize("with_index", [True, False])
def test_mtp_layer_is_skipped(hf_ckpt, converted, tmp_path, with_index):
    src = Path(shutil.copytree(hf_ckpt["v3"], tmp_path / "hf"))
    extra = {name: torch.randn(shape) for name, shape in MTP_TENSORS.items()}
    names = list(extra)
    index = json.loads((src / INDEX).read_text())
    # most in a file of their own, one added to an existing file
    save_file({n: extra[n] for n in names[1:]}, src / "model-mtp.safetensors", {"format": "pt"})
    index["weight_map"].update(dict.fromkeys(names[1:], "model-mtp.safetensors"))
    host = index["weight_map"]["model.norm.weight"]
    rewrite(src / host, lambda tensors: tensors.update({names[0]: extra[names[0]]}))
    index["weight_map"][names[0]] = host
    if with_index:
        (src / INDEX).write_text(json.dumps(index))
    else:
        (src / INDEX).unlink()  # the files themselves are scanned
    convert(src, tmp_path / "out", 2)
    for rank in range(2):
        got, got_meta = read_shard(tmp_path / "out" / shard_name(rank, 2))
        want, want_meta = read_shard(converted["v3"] / shard_name(rank, 2))
        assert got_meta == want_meta
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)


# ---------------------------------------------------------------------------------------------------- output


def test_cli_output_is_self_sufficient(hf_ckpt, converted, tmp_path):
    """The CLI writes the same shards as convert(), plus config.json and the tokenizer files, nothing else."""
    src = Path(shutil.copytree(hf_ckpt["v3"], tmp_path / "hf"))
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}\n')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256, "bos_token": "<s>"}\n')
    out = tmp_path / "out"
    result = cli("--hf-ckpt-path", src, "--save-path", out, "--model-parallel", 2)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            *map(shard_name, (0, 1), (2, 2)),
        ]
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    shutil.rmtree(src)  # what follows reads the output folder alone
    for rank in range(2):
        got, got_meta = read_shard(out / shard_name(rank, 2))
        want, want_meta = read_shard(converted["v3"] / shard_name(rank, 2))
        assert got_meta == want_meta and set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert load_config(out / "config.json") == load_config(converted["v3"] / "config.json")


# ---------------------------------------------------------------------------------------------------- bad HF folders


@pytest.fixture
def hf_copy(hf_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(hf_ckpt["v3"], tmp_path / "hf"))


def drop_tensor(src: Path, hf_name: str, from_index: bool) -> None:
    index = json.loads((src / INDEX).read_text())
    rewrite(src / index["weight_map"][hf_name], lambda tensors: tensors.pop(hf_name))
    if from_index:
        del index["weight_map"][hf_name]
        (src / INDEX).write_text(json.dumps(index))


def test_convert_missing_tensor(hf_copy, tmp_path):
    drop_tensor(hf_copy, "model.layers.1.self_attn.kv_b_proj.weight", from_index=True)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wkv_b\.weight is missing"):
        convert(hf_copy, tmp_path / "out", 2)


def test_convert_tensor_missing_from_its_file(hf_copy, tmp_path):
    """The index still places the tensor in a file that does not hold it."""
    name = "model.layers.2.mlp.experts.7.down_proj.weight"
    drop_tensor(hf_copy, name, from_index=False)
    with pytest.raises(CheckpointError, match=name):
        convert(hf_copy, tmp_path / "out", 2)


def test_convert_missing_file(hf_copy, tmp_path):
    index = json.loads((hf_copy / INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf_copy / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        convert(hf_copy, tmp_path / "out", 2)
    result = cli("--hf-ckpt-path", hf_copy, "--save-path", tmp_path / "cli", "--model-parallel", 2)
    assert_cli_error(result, victim, "is missing")


def test_convert_misshaped_tensor(hf_copy, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    index = json.loads((hf_copy / INDEX).read_text())
    rewrite(hf_copy / index["weight_map"][name], lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(64, 63\)"):
        convert(hf_copy, tmp_path / "out", 2)
    assert not list((tmp_path / "out").glob("*.safetensors")), "a refused checkpoint writes no shard"
    result = cli("--hf-ckpt-path", hf_copy, "--save-path", tmp_path / "cli")
    assert_cli_error(result, name, "(64, 63)", "(64, 64)", progress=True)


def test_convert_world_size_that_does_not_divide(hf_ckpt, tmp_path):
    result = cli("--hf-ckpt-path", hf_ckpt["v3"], "--save-path", tmp_path / "out", "--model-parallel", 3)
    assert_cli_error(result, "n_heads=4", "world size 3")
    assert not (tmp_path / "out").exists()


def test_convert_without_config(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        convert(tmp_path / "hf", tmp_path / "out", 1)


# ---------------------------------------------------------------------------------------------------- bad shards


def load_ws1(ckpt_dir: Path):
    args = load_config(ckpt_dir / "config.json", dtype="fp32", max_seq_len=16, max_batch_size=1)
    return load_model(args, ckpt_dir, TensorParallel(), torch.device("cpu"))


def test_load_shards_for_another_world_size(converted, tmp_path):
    ckpt = copy_ckpt(converted["v3"], tmp_path / "mp2", 2)
    with pytest.raises(CheckpointError, match=r"world size 2, not 1 .*convert with --model-parallel 1"):
        load_ws1(ckpt)


def test_load_shard_renamed_to_another_world_size(converted, tmp_path):
    ckpt = copy_ckpt(converted["v3"], tmp_path / "ckpt")
    shutil.copy2(converted["v3"] / shard_name(0, 2), ckpt / shard_name(0, 1))
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors was written for world size 2, not 1"):
        load_ws1(ckpt)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("layers.1.attn.wkv_b.weight"), r"tensor layers\.1\.attn\.wkv_b\.weight is missing"),
        (lambda t: t.update({"layers.9.ffn.w1.weight": torch.zeros(2)}), r"unexpected tensor layers\.9\.ffn\.w1"),
        (
            lambda t: t.update({"norm.weight": torch.ones(65)}),
            r"tensor norm\.weight has shape \(65,\), the model expects \(64,\)",
        ),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_load_bad_tensor(converted, tmp_path, edit, message):
    ckpt = copy_ckpt(converted["v3"], tmp_path / "ckpt", 1)
    rewrite(ckpt / shard_name(0, 1), edit)
    with pytest.raises(CheckpointError, match=message):
        load_ws1(ckpt)


def test_load_fp8_weight_stored_as_bf16(fp8_ckpt, tmp_path):
    """Shard and config.json disagree on FP8: one weight was dequantised, its scale kept."""
    ckpt = copy_ckpt(fp8_ckpt["out"], tmp_path / "ckpt", 1)
    name = "layers.1.ffn.shared_experts.w2.weight"

    def dequantise_one(tensors):
        tensors[name] = fp8.dequantize(tensors[name], tensors[name.removesuffix("weight") + "scale"], torch.bfloat16)

    rewrite(ckpt / shard_name(0, 1), dequantise_one)
    with pytest.raises(CheckpointError, match=rf"tensor {name} is torch.bfloat16, .*FP8 weights and config.json"):
        load_ws1(ckpt)


def test_missing_shard_fails_on_every_rank(converted, tmp_path):
    ckpt = copy_ckpt(converted["v3"], tmp_path / "ckpt", 1, 2, 4)
    (ckpt / shard_name(1, 2)).unlink()
    start = time.monotonic()
    with pytest.raises(RankError) as e:
        run_ranks(2, rank_fns.load, str(ckpt), timeout=60)
    elapsed = time.monotonic() - start
    assert elapsed < 60
    assert set(e.value.errors) == {0, 1}
    for rank, error in e.value.errors.items():
        first = error.splitlines()[0]
        print(f"rank {rank}: {first}")
        assert "CheckpointError: rank 1: " in first and "model1-mp2.safetensors is missing" in first
        assert "world size 2 are incomplete" in first and "--model-parallel 2" in first


def test_bad_rank1_shard_fails_on_every_rank(converted, tmp_path):
    """A shard that only rank 1 reads is wrong: both ranks raise, naming rank 1 and the tensor."""
    cases = {
        "layers.0.attn.wkv_b.weight has shape (95, 32)": lambda t: t.update(
            {"layers.0.attn.wkv_b.weight": t["layers.0.attn.wkv_b.weight"][:-1]}
        ),
        "tensor layers.2.ffn.experts.7.w3.weight is missing": lambda t: t.pop("layers.2.ffn.experts.7.w3.weight"),
        "unexpected tensor layers.2.ffn.experts.0.w3.weight": lambda t: t.update(
            {"layers.2.ffn.experts.0.w3.weight": t["layers.2.ffn.experts.7.w3.weight"].clone()}
        ),
    }
    dirs = []
    for i, edit in enumerate(cases.values()):
        dirs.append(copy_ckpt(converted["v3"], tmp_path / f"case{i}", 2))
        rewrite(dirs[-1] / shard_name(1, 2), edit)
    results = run_ranks(2, rank_fns.load_errors, [str(d) for d in dirs], timeout=60)
    for errors in results:
        for message, error in zip(cases, errors, strict=True):
            assert error is not None and error.startswith("rank 1: model1-mp2.safetensors: "), error
            assert message in error, error


def test_load_errors_at_world_size_4(converted, tmp_path):
    """Shards for world size 2 at 4; and a config that does not divide, refused before any weight is read (the
    shards are not even safetensors files)."""
    mp2 = copy_ckpt(converted["v3"], tmp_path / "mp2", 2)
    heads = copy_ckpt(converted["v3"], tmp_path / "heads", 4)
    config = json.loads((heads / "config.json").read_text())
    config["num_attention_heads"] = config["num_key_value_heads"] = 6
    (heads / "config.json").write_text(json.dumps(config))
    for rank in range(4):
        (heads / shard_name(rank, 4)).write_bytes(b"not a safetensors file")
    results = run_ranks(4, rank_fns.load_errors, [str(mp2), str(heads)], timeout=60)
    for wrong_size, not_dividing in results:
        assert "holds shards for world size 2, not 4" in wrong_size and "--model-parallel 4" in wrong_size
        assert "n_heads=6 is not divisible by the world size 4" in not_dividing, not_dividing
