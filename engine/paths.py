"""Where ldlm keeps what it builds on this machine (the demo's model, native kernels, Inductor's cache, the key
that signs this user's AOTInductor exports): $LDLM_CACHE, by default ~/.cache/ldlm; and whether a place is this
user's alone, which decides whether ldlm may load native code or a key from it.

A place is private when this user owns it and neither group nor others can write it, and when every folder
above it is owned by this user or root and writable by no one else unless its sticky bit keeps others from
renaming what is in it (as /tmp's does): what OpenSSH checks before it reads a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

KEY_BYTES = 32


class UnsafePath(PermissionError):
    """A place that someone other than this user could write; the message names it and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDLM_CACHE", Path.home() / ".cache" / "ldlm"))


def file_sha256(path: Path) -> str:
    """A file's sha256, read a MiB at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _others_can_write(info: os.stat_result) -> bool:
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def check_private(path: Path, *, what: str) -> None:
    """Raise UnsafePath unless `path` (a file or folder) and every folder above it are this user's alone (see
    the module's docstring). `what` names the place in the message."""
    uid = os.geteuid()
    path = Path(os.path.abspath(path))
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f"{what} {path} is a symbolic link; ldlm loads native code and keys only from real files "
                         "and folders: remove the link")
    if info.st_uid != uid:
        raise UnsafePath(f"{what} {path} belongs to user id {info.st_uid}, not to this user ({uid}): remove it, or "
                         "point LDLM_CACHE at a folder of your own")
    if _others_can_write(info):
        raise UnsafePath(f"{what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
                         f"chmod go-w {path}, or point LDLM_CACHE at a private folder")
    for parent in path.parents:
        info = os.stat(parent)
        if info.st_uid not in (uid, 0):
            raise UnsafePath(f"{what} {path} lies in {parent}, which belongs to user id {info.st_uid}: point "
                             "LDLM_CACHE at a folder of your own")
        if _others_can_write(info) and not info.st_mode & stat.S_ISVTX:
            raise UnsafePath(f"{what} {path} lies in {parent}, which other users can write (mode "
                             f"{stat.S_IMODE(info.st_mode):o}) without the sticky bit, so they could replace it: "
                             "point LDLM_CACHE at a private folder")


def private_dir(path: Path, *, what: str) -> Path:
    """`path` as a folder only this user can write: made (mode 0700) where missing, checked by check_private
    either way. Raises UnsafePath, or OSError where it cannot be made."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path, what=what)
    return path


def read_private_file(path: Path, *, what: str) -> bytes:
    """The bytes of a file that check_private passes, read from the descriptor that was checked (no symbolic
    link followed, so nothing can swap the file between the check and the read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077 or not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{what} {path} must be a regular file of this user's that no one else can read or "
                             f"write (mode 600; it is {stat.S_IMODE(info.st_mode):o}): remove it to start anew")
        check_private(path.parent, what=what + "'s folder")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def write_private_file(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write `data` to `path`, mode 600, atomically (a reader sees no file or the whole of it). replace=False:
    only where no file is there yet (FileExistsError otherwise), so of two processes the first one wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists: never replaces a key another process already uses
    finally:
        tmp.unlink(missing_ok=True)


def signing_key() -> bytes:
    """This user's key for signing what ldlm writes that holds native code (AOTInductor exports): 32 random
    bytes in $LDLM_CACHE/keys/signing.key (mode 600, its folder 700), made on first use."""
    folder = private_dir(default_cache_dir() / "keys", what="ldlm's key folder")
    path = folder / "signing.key"
    if not path.exists():
        try:
            write_private_file(path, os.urandom(KEY_BYTES), replace=False)
        except FileExistsError:  # another process made it first: use that one
            pass
    key = read_private_file(path, what="ldlm's signing key")
    if len(key) != KEY_BYTES:
        raise UnsafePath(f"ldlm's signing key {path} holds {len(key)} bytes, not {KEY_BYTES}: remove it to make "
                         "a new one (exports signed with the old one then need --trust-native-code)")
    return key


def sign(message: bytes) -> str:
    """HMAC-SHA256 of `message` under this user's signing key, as hex."""
    return hmac.new(signing_key(), message, "sha256").hexdigest()


def signed_here(message: bytes, signature: object) -> bool:
    """Whether `signature` is this user's signing key's HMAC of `message` (constant time); False where the key
    cannot be read."""
    if not isinstance(signature, str):
        return False
    try:
        return hmac.compare_digest(sign(message), signature)
    except OSError:  # UnsafePath too
        return False


def private_inductor_cache() -> str:
    """Point Inductor's on-disk cache (kernels it compiled, which it loads again as native code; Triton's
    cache sits inside it) at a place only this user can write, and say which: $TORCHINDUCTOR_CACHE_DIR where the
    user set it (checked private, else UnsafePath), else $LDLM_CACHE/inductor instead of torch's default
    /tmp/torchinductor_<user>, a name anyone can create first on a shared machine."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(torch_default()):  # torch sets it to its default
        private_dir(Path(chosen), what="Inductor's cache ($TORCHINDUCTOR_CACHE_DIR)")
        where = f"Inductor's cache in {chosen} ($TORCHINDUCTOR_CACHE_DIR, checked private)"
    else:
        folder = private_dir(default_cache_dir() / "inductor", what="Inductor's cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        where = f"Inductor's cache in {folder} (private)"
    return where + _private_precompiled_headers(Path(torch_default()) / "precompiled_headers")


def _private_precompiled_headers(folder: Path) -> str:
    """Inductor keeps its precompiled C++ headers, which go into everything it compiles, in torch's default
    /tmp folder whatever TORCHINDUCTOR_CACHE_DIR says. Keep them where that folder is this user's alone (made
    so where missing), else turn them off for this process (slower compiles, nothing read from there)."""
    import torch._inductor.config as inductor_config

    try:
        private_dir(folder.parent, what="Inductor's default folder")
        private_dir(folder, what="Inductor's precompiled headers")
        return ""
    except OSError as e:
        inductor_config.cpp_cache_precompile_headers = False
        inductor_config.aot_inductor.precompile_headers = False
        return f"; precompiled headers off ({e})"
