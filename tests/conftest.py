import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_hf_checkpoint

from tp_infer.convert import convert


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory):
    """Hugging Face folders of the tiny variants, {"v3": path, "v2": path, "v32": path}."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: write_hf_checkpoint(kind, root / kind) for kind in ("v3", "v2", "v32")}


@pytest.fixture(scope="session")
def converted(hf_ckpt, tmp_path_factory):
    """converted[kind] is a folder holding shards for world sizes 1, 2 and 4."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for kind, path in hf_ckpt.items():
        out[kind] = root / kind
        for world_size in (1, 2, 4):
            convert(path, out[kind], world_size)
    return out


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A converted checkpoint with a tokenizer and chat template, with shards for world sizes 1, 2 and 4."""
    from checkpoints import write_chat_checkpoint

    root = tmp_path_factory.mktemp("chat")
    hf = write_chat_checkpoint(root / "hf")
    for world_size in (1, 2, 4):
        convert(hf, root / "ckpt", world_size)
    return root / "ckpt"


@pytest.fixture(scope="session")
def v32_chat_ckpt(tmp_path_factory):
    """A converted DeepSeek-V3.2 checkpoint with the V3.2 tokenizer folder (no chat template: DeepSeek's encoder
    renders), with shards for world sizes 1 and 2."""
    from checkpoints import write_v32_chat_checkpoint

    root = tmp_path_factory.mktemp("v32chat")
    hf = write_v32_chat_checkpoint(root / "hf")
    for world_size in (1, 2):
        convert(hf, root / "ckpt", world_size)
    return root / "ckpt"
