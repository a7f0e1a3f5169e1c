"""Native code runs only from places this user alone can write (issue 37): ldlm.paths' rule, the C beam
helper's cache, Inductor's cache.

Each native-cache case runs a fresh interpreter (the library is loaded once per process) against a cache built
in a temporary folder, with a planted library whose constructor writes a marker file when it is loaded: the
marker must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldlm.paths import UnsafePath, check_private, private_dir, private_inductor_cache, signing_key

HAS_CC = any(shutil.which(n) for n in (os.environ.get("CC") or "cc", "gcc", "clang"))
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("LDLM_TEST_MARKER"), "w");
    if (f) { fputs("the planted library ran", f); fclose(f); }
}
"""
LOAD = """
import json
from ldlm.kernels import native
print(json.dumps({"reason": native.unavailable_reason(), "note": native.load_note()}))
"""


def test_private_places(tmp_path):
    mine = private_dir(tmp_path / "a" / "b", what="the test folder")
    assert (mine.stat().st_mode & 0o777) == 0o700
    check_private(mine, what="x")

    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafePath, match=r"loose is writable by other users \(mode 777\)"):
        check_private(loose, what="the cache")
    inner = loose / "inner"
    inner.mkdir(mode=0o700)
    with pytest.raises(UnsafePath, match="which other users can write .* without the sticky bit"):
        check_private(inner, what="the cache")
    loose.chmod(0o1777)  # as /tmp: others cannot rename what is not theirs
    check_private(inner, what="the cache")

    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        check_private(link, what="the cache")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root (CI runs as root)")
def test_a_folder_of_another_user_is_not_private(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to user id 65534"):
        check_private(theirs, what="the cache")


def test_the_signing_key_is_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("LDLM_CACHE", str(tmp_path / "cache"))
    key = signing_key()
    path = tmp_path / "cache" / "keys" / "signing.key"
    assert len(key) == 32 and signing_key() == key and (path.stat().st_mode & 0o777) == 0o600
    path.chmod(0o644)
    with pytest.raises(UnsafePath, match="mode 600"):
        signing_key()


def test_inductor_cache_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("LDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert "(private)" in private_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    with pytest.raises(UnsafePath, match="Inductor's cache .* writable by other users"):
        private_inductor_cache()


def test_precompiled_headers_only_from_a_private_folder(tmp_path):
    """Inductor reads its precompiled headers from torch's default /tmp folder whatever the cache says: a folder
    others can write turns them off; a private one keeps them."""
    import torch._inductor.config as inductor_config

    from ldlm.paths import _private_precompiled_headers

    # torch's config objects are restored by hand: monkeypatch's undo leaves them without the attribute
    saved = inductor_config.cpp_cache_precompile_headers, inductor_config.aot_inductor.precompile_headers
    try:
        inductor_config.cpp_cache_precompile_headers = inductor_config.aot_inductor.precompile_headers = True
        assert _private_precompiled_headers(tmp_path / "mine" / "precompiled_headers") == ""
        assert inductor_config.cpp_cache_precompile_headers and inductor_config.aot_inductor.precompile_headers
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        note = _private_precompiled_headers(shared / "precompiled_headers")
        assert "precompiled headers off" in note and "writable by other users" in note
        assert not inductor_config.cpp_cache_precompile_headers and not inductor_config.aot_inductor.precompile_headers
    finally:
        inductor_config.cpp_cache_precompile_headers, inductor_config.aot_inductor.precompile_headers = saved


def _load_native(cache: Path, marker: Path) -> dict:
    env = {**os.environ, "LDLM_CACHE": str(cache), "LDLM_TEST_MARKER": str(marker)}
    done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plant(library: Path, tmp_path: Path) -> None:
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)


@pytest.mark.skipif(not HAS_CC, reason="the native helper needs a C compiler")
def test_a_planted_library_in_the_native_cache_never_runs(tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    assert _load_native(cache, marker) == {"reason": None, "note": ""}
    (library,) = (cache / "native").glob("beam_update-*.so")
    record = library.with_name(library.name + ".sha256")
    assert (cache / "native").stat().st_mode & 0o777 == 0o700 and record.stat().st_mode & 0o777 == 0o600

    control = tmp_path / "control.so"  # the planted library does write its marker when something loads it
    _plant(control, tmp_path)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(control)!r})"], check=True,
                   env={**os.environ, "LDLM_TEST_MARKER": str(marker)})
    assert marker.read_text() == "the planted library ran"
    marker.unlink()

    # 1. replaced in place, the record left: the hash differs, so it is rebuilt, not loaded
    _plant(library, tmp_path)
    assert _load_native(cache, marker) == {"reason": None, "note": ""}
    assert not marker.exists()

    # 2. replaced with its record rewritten to match, in a cache folder others can write: not trusted at all
    import hashlib

    _plant(library, tmp_path)
    record.write_text(hashlib.sha256(library.read_bytes()).hexdigest())
    (cache / "native").chmod(0o777)
    loaded = _load_native(cache, marker)
    assert loaded["reason"] is None and "private temporary folder" in loaded["note"]
    assert "writable by other users" in loaded["note"] and not marker.exists()

    # 3. the same in a folder another user owns (as root: CI)
    if os.geteuid() == 0:
        (cache / "native").chmod(0o755)
        os.chown(cache / "native", 65534, 65534)
        loaded = _load_native(cache, marker)
        assert "belongs to user id 65534" in loaded["note"] and not marker.exists()


@pytest.mark.skipif(not HAS_CC, reason="the native helper needs a C compiler")
def test_a_cache_that_cannot_be_made_falls_back_to_a_private_build(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    loaded = _load_native(blocker, tmp_path / "marker")
    assert loaded["reason"] is None and "private temporary folder" in loaded["note"]
    assert "Not a directory" in loaded["note"]
