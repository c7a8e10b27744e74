"""The disk tier's files on each rank: one safetensors file per block (every layer's cache of its tokens), named by
the block's key, in a folder per fingerprint of what produced them.

    DIR/<fingerprint>/<key>.safetensors          absorb: the latent is the same on every rank; rank 0 writes it once
    DIR/<fingerprint>/<key>.rank<r>.safetensors  naive: each rank's own heads

Only tensors are stored (no pickle). A file is used only if its header names the key, fingerprint and rank asked for,
its tensors have the pool's names, shapes and dtypes, and a checksum over their bytes holds; anything else (truncated,
corrupt, another model's) is skipped with one line on stderr and its tokens are recomputed. Writes go to a temporary
file renamed into place, so a reader never sees half a file; a write that fails (read-only folder, full disk) is
reported once and the block is simply not kept.
"""

import contextlib
import hashlib
import json
import os
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch

from tp_infer.config import ModelArgs

FORMAT = "tp_infer-kv-1"
SAMPLE_BYTES = 1 << 16  # of each weight file's start and end, in the fingerprint


def fingerprint(args: ModelArgs, ckpt_path: str | Path, world_size: int, block_size: int) -> str:
    """A digest of everything that makes a block's cache what it is: the architecture and numerics (not the
    runtime limits max_batch_size and max_seq_len, which change no value), the world size, the block size, and the
    checkpoint's weight files (names, sizes, and their first and last 64 KiB: headers and some weights)."""
    h = hashlib.blake2b(digest_size=16)
    fields = {k: v for k, v in asdict(args).items() if k not in ("max_batch_size", "max_seq_len")}
    setup = {"format": FORMAT, "args": fields, "world_size": world_size, "block_size": block_size}
    h.update(json.dumps(setup, sort_keys=True).encode())
    for path in sorted(Path(ckpt_path).glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Write a file through a temporary one renamed into place (a reader never sees half of it), readable by the
    user only. Raises OSError, the temporary file removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DiskFiles:
    """This rank's access to the disk tier. `shared`: one file per block serves every rank (absorb), written by rank
    0 only."""

    def __init__(self, root: str | Path, fingerprint: str, rank: int, shared: bool):
        self.dir = Path(root) / fingerprint
        self.fingerprint, self.rank, self.shared = fingerprint, rank, shared
        self.owner = rank if not shared else "shared"
        self.writes = not shared or rank == 0
        self.reported: set[str] = set()
        self.saved = 0  # files this rank wrote
        try:
            os.makedirs(self.dir.parent, mode=0o700, exist_ok=True)
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as e:
            self.report("folder", f"cannot create {self.dir} ({e.strerror}): nothing is kept on disk")
            self.writes = False

    def report(self, kind: str, message: str) -> None:
        """One line on stderr, once per kind of trouble (a full disk would otherwise say so for every block)."""
        if kind not in self.reported:
            self.reported.add(kind)
            self.say(message)

    def say(self, message: str) -> None:
        sys.stderr.write(f"kv disk tier, rank {self.rank}: {message}\n")  # one write: ranks share the stream
        sys.stderr.flush()

    def path(self, key: bytes) -> Path:
        suffix = "" if self.shared else f".rank{self.rank}"
        return self.dir / f"{key.hex()}{suffix}.safetensors"

    def save(self, key: bytes, tensors: dict[str, torch.Tensor]) -> bool:
        """Write a block's file; False (reported once) when it cannot be written."""
        if not self.writes:
            return False
        tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
        meta = {"format": FORMAT, "key": key.hex(), "fingerprint": self.fingerprint, "rank": str(self.owner)}
        meta["checksum"] = checksum(tensors)
        data = safetensors.torch.save(tensors, metadata=meta)
        path = self.path(key)
        try:
            write_private(path, data)
        except OSError as e:
            self.report(f"write {e.errno}", f"cannot write {path} ({e.strerror}): such blocks are not kept on disk")
            return False
        self.saved += 1
        return True

    def load(self, key: bytes, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict | None:
        """The block's tensors if its file is whole and made for this key, model and rank; None (reported) if not."""
        path = self.path(key)
        try:
            data = path.read_bytes()
            (length,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError("made by another checkpoint or setup (world size, attention, dtypes, block size)")
            if meta.get("rank") != str(self.owner):
                raise ValueError(f"made for rank {meta.get('rank')}, not {self.owner}")
            if meta.get("key") != key.hex():
                raise ValueError(f"it holds block {meta.get('key')}, not this one")
            tensors = safetensors.torch.load(data)
            layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
            if layout != expected:
                raise ValueError("its tensors are not the pool's")
            if checksum(tensors) != meta.get("checksum"):
                raise ValueError("its checksum does not match its contents")
        except FileNotFoundError:
            self.report("missing", f"{path} is gone: recomputing what it held")
            return None
        except Exception as e:  # a damaged file may fail anywhere in parsing: skip it, whatever the error
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.say(f"skipped {path}: {reason}")
            return None
        if self.writes:
            with contextlib.suppress(OSError):
                os.utime(path)  # for the next job's LRU order
        return tensors

    def delete(self, key: bytes) -> None:
        if self.writes:
            self.path(key).unlink(missing_ok=True)

    def scan(self) -> list[bytes]:
        """The keys of this rank's files (the shared ones in absorb mode), least recently used first. Temporary files
        left by a job that died while writing are removed."""
        suffix = ".safetensors" if self.shared else f".rank{self.rank}.safetensors"
        found = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                if self.writes:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            stem = name.removesuffix(suffix)
            if stem == name or len(stem) != 32 or "." in stem:
                continue
            try:
                found.append((entry.stat().st_mtime_ns, bytes.fromhex(stem)))
            except (OSError, ValueError):
                continue
        return [key for _, key in sorted(found)]
