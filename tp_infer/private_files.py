"""Files that only this user can have written: the disk tier's blocks, the replies' ids beside them, the compiled
kernels. A folder is trusted only when this user owns it and nobody else may write in it (a missing one is created
0700); files in it are opened without following symbolic links, temporaries are created exclusively, and a folder's
secret key (32 random bytes in a 0600 file) lets its files be authenticated, so that a file this program did not
write there is never used."""

import contextlib
import errno
import hmac
import os
import secrets
import stat
from pathlib import Path

SECRET_BYTES = 32
SECRET_NAME = ".tp_infer-secret"  # in the folder it authenticates
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(ValueError):
    """A folder or file that someone other than this user could have written; the message names it and says why."""


def ensure_private_dir(path: str | Path) -> Path:
    """The folder, created 0700 (with its missing parents) if it does not exist. Raises UnsafePathError when it is
    not a folder, is not owned by this user, or is writable by its group or others; OSError when it cannot be
    created. A symbolic link to a folder is judged by the folder it names."""
    path = Path(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a folder")
    check_owner(path, st, "folder")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit)
        raise UnsafePathError(
            f"folder {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): its files cannot be trusted "
            f"(chmod go-w {path}, or choose another folder)"
        )
    return path


def check_owner(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise UnsafePathError(
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): its contents cannot "
            f"be trusted"
        )


def check_private_file(path: str | Path) -> None:
    """Raise UnsafePathError unless `path` is a regular file (not a symbolic link) of this user that its group and
    others cannot write: for a file used by its path (a shared library to load) in a folder ensure_private_dir
    accepted. OSError (FileNotFoundError) when it does not exist."""
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symbolic link: not followed")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file")
    check_owner(path, st, "file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(f"file {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): not used")


def open_private(path: str | Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor for `path`, never through a symbolic link (UnsafePathError), created 0600 with O_CREAT. A file
    opened for reading must be a regular file owned by this user (UnsafePathError otherwise); a FIFO does not
    block the open."""
    writing = flags & (os.O_WRONLY | os.O_RDWR)
    try:
        fd = os.open(path, flags | NOFOLLOW | (0 if writing else os.O_NONBLOCK), 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symbolic link: not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        check_owner(Path(path), st, "file")
        if not writing:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str | Path, limit: int | None = None, secret: bool = False) -> bytes:
    """The contents of a regular file this user owns, opened without following a symbolic link. limit: refuse
    (UnsafePathError) a file larger than this many bytes before reading it. secret: refuse a file that its group or
    others may read."""
    fd = open_private(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if limit is not None and st.st_size > limit:
            raise UnsafePathError(f"{path} holds {st.st_size} bytes, more than the {limit} expected")
        if secret and st.st_mode & 0o077:
            raise UnsafePathError(f"{path} may be read by others (mode {stat.S_IMODE(st.st_mode):04o})")
        return f.read() if limit is None else f.read(limit + 1)


def temporary_path(path: Path) -> Path:
    """An unguessable name beside `path` for the file that will replace it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def write_private(path: str | Path, data: bytes) -> None:
    """Write a file readable by the user only, through a temporary one created exclusively (a planted file or link
    makes it fail, never writes through it) and renamed into place (a reader never sees half of it; the rename
    replaces a link at `path`, not what it names). Raises OSError, the temporary file removed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except FileExistsError:
        raise  # not ours to remove
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def folder_secret(folder: str | Path) -> bytes:
    """The folder's secret key, created (32 random bytes, mode 0600) if it has none. Several processes may ask at
    once: the key is written to a temporary file and linked into place, so all of them get the same whole key.
    Raises UnsafePathError for a key file that is not a private, whole key of this user; OSError when it cannot be
    read or created."""
    path = Path(folder) / SECRET_NAME
    if not os.path.lexists(path):
        tmp = temporary_path(path)
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
        try:
            os.link(tmp, path)  # never replaces: whoever comes first sets the key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = read_private(path, limit=SECRET_BYTES, secret=True)
    if len(key) != SECRET_BYTES:
        raise UnsafePathError(f"{path} is not a key of {SECRET_BYTES} bytes (it holds {len(key)})")
    return key


def authenticator(secret: bytes) -> "hmac.HMAC":
    """A fresh HMAC-SHA256 under `secret`, for update() with what a file holds."""
    return hmac.new(secret, digestmod="sha256")


def same_code(given: object, expected: str) -> bool:
    """Whether an authentication code read from a file (any JSON value) is the expected one, in constant time."""
    return isinstance(given, str) and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )
