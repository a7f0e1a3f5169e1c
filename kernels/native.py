"""ldlm's C kernels for the CPU (beam_update.c): built with the system C compiler on first use, cached, called
through ctypes.

Small per-token work (the beam search's bookkeeping, a KV-cache row gather) costs a CPU far more as dozens of
torch operators, each a fixed overhead of several microseconds, than as one loop: here it is one call. The
source needs no Python or torch headers, so it builds in well under a second; the library is cached under
$LDLM_CACHE/native by a hash of the source, the compiler, its flags and the CPU, so a changed source or
another machine sharing the cache builds its own. A cached library is native code that runs in this process, so
it loads only from a folder that is this user's alone (ldlm.paths.check_private) and only if its bytes match the
hash recorded when it was built; otherwise it is rebuilt, in a private temporary folder when the cache cannot be
trusted or made. Without a C compiler (cc, gcc or clang, or $CC) callers keep
their torch path; `unavailable_reason()` says why.

    from ldlm.kernels import native
    native.unavailable_reason()        # None when the library loads
    update = native.BeamUpdate(B, K, T, V, eos=eos, pad=pad, no_repeat_ngram_size=3)
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("beam_update.c")
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-pthread")
MAX_BEAMS = 32  # the kernel's fixed per-item candidate array holds 2 * 32
NEG_INF = -1.0e9  # ldlm.sampling.beam_search.NEG_INF (this module sits below ldlm and imports none of it)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_where = ""  # why the library was built somewhere else than the cache, if it was


class NativeUnavailable(RuntimeError):
    """ldlm's C kernels cannot be built or loaded here; the message says why."""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, out: Path) -> None:
    """Build the library into `out`, for this CPU where the compiler can (-march=native), else portably, and
    record its sha256 beside it (mode 600): what a later process checks before it loads the file."""
    from ldlm.paths import file_sha256, write_private_file

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        errors = ""
        for extra in (("-march=native",), ()):
            run = subprocess.run([compiler, *FLAGS, *extra, "-o", str(built), str(SOURCE), "-lm"],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                os.chmod(built, 0o700)
                digest = file_sha256(built)
                os.replace(built, out)  # atomic: a concurrent process loads either nothing or the whole file
                write_private_file(_hash_file(out), digest.encode())
                return
            errors = run.stderr.strip()
        raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: {errors[-400:]}")


def library() -> ctypes.CDLL:
    """The loaded C library, built on first use; NativeUnavailable if it cannot be."""
    global _library, _failure
    with _lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise NativeUnavailable(_failure)
        try:
            _library = _load()
        except NativeUnavailable as e:
            _failure = str(e)
            raise
        return _library


def _hash_file(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


def _verified(path: Path) -> bool:
    """Whether a cached library may be loaded: it and its recorded hash are this user's alone (ldlm.paths'
    rule) and its bytes hash to the record. Anything else (a planted file, another user's, a changed one) is
    rebuilt."""
    from ldlm.paths import check_private, file_sha256, read_private_file

    try:
        check_private(path, what="the cached native library")
        recorded = read_private_file(_hash_file(path), what="the native library's recorded hash").decode()
    except (OSError, UnicodeDecodeError):  # UnsafePath, a missing record
        return False
    return recorded == file_sha256(path)


def _private_folder() -> tuple[Path, str]:
    """Where to build and load the library: $LDLM_CACHE/native where that is this user's alone (made 0700 if
    missing), else a new private temporary folder for this process (rebuilt each time), with a note why."""
    from ldlm.paths import default_cache_dir, private_dir

    cache = default_cache_dir() / "native"
    try:
        return private_dir(cache, what="ldlm's native cache"), ""
    except OSError as e:  # UnsafePath (another user's, or writable by others), a read-only home, a file in the way
        why = str(e) if e.strerror is None else f"{cache}: {e.strerror}"
        folder = Path(tempfile.mkdtemp(prefix="ldlm-native-"))  # mode 700
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the loaded library needs no file
        return folder, f"built in a private temporary folder, since {why}"


def _load() -> ctypes.CDLL:
    global _where
    compiler = _compiler()
    if compiler is None:
        raise NativeUnavailable("no C compiler found (cc, gcc or clang, or set $CC) to build ldlm's native beam "
                                "update; install one (e.g. apt install gcc) for the faster decode")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError as e:
        raise NativeUnavailable(f"C compiler {compiler} does not run: {e}") from e
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS),
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    folder, _where = _private_folder()
    path = folder / f"beam_update-{key}.so"
    try:
        if not _verified(path):
            _compile(compiler, path)
    except OSError as e:  # the folder filled up or went away: an optimisation, so the caller keeps torch
        raise NativeUnavailable(f"could not build ldlm's native beam update in {folder}: {e}") from e
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"{path} does not load ({e}); delete it to rebuild") from e
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    lib.ldlm_beam_scratch_bytes.argtypes, lib.ldlm_beam_scratch_bytes.restype = [i64] * 4, i64
    lib.ldlm_beam_update.argtypes = [ptr, *[i64] * 7, f64, i64, *[ptr] * 9]
    lib.ldlm_beam_update.restype = i64
    lib.ldlm_gather_rows.argtypes, lib.ldlm_gather_rows.restype = [ptr, ptr, i64, i64, ptr, ptr, i64], i64
    return lib


def unavailable_reason() -> str | None:
    """None when the native library loads here, else why it does not."""
    try:
        library()
    except NativeUnavailable as e:
        return str(e)
    return None


def load_note() -> str:
    """After a load: "" when the library came from ldlm's cache, else where it was built instead and why."""
    return _where


class BeamUpdate:
    """The beam search's state for B items of K beams and T tokens, as ldlm.sampling.beam_search holds it, updated
    by the C kernel one token at a time: `update(logits, cur)` is one iteration of that loop's bookkeeping."""

    def __init__(self, B: int, K: int, T: int, V: int, *, eos: int, pad: int, no_repeat_ngram_size: int,
                 length_penalty: float = 1.0, early_stopping: bool = True):
        if not 1 <= K <= MAX_BEAMS:
            raise ValueError(f"the native beam update takes 1 to {MAX_BEAMS} beams, got {K}")
        self.lib, self.B, self.K, self.T, self.V = library(), B, K, T, V
        self.running = torch.full((B, K, T), pad, dtype=torch.long)  # live beams' tokens
        self.running_scores = torch.zeros(B, K)
        self.running_scores[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
        self.finished = self.running.clone()  # (B, K, T) best finished hypotheses
        self.finished_scores = torch.full((B, K), NEG_INF)
        self.is_finished = torch.zeros(B, K, dtype=torch.uint8)
        self.improvable = torch.ones(B, dtype=torch.uint8)
        self.source_rows = torch.zeros(B * K, dtype=torch.long)  # out: cache row each new beam row continues
        self.next_tokens = torch.zeros(B * K, dtype=torch.long)  # out: each row's token at the current position
        self.scratch = torch.empty(self.lib.ldlm_beam_scratch_bytes(B, K, T, V), dtype=torch.uint8)
        self._settings = (B, K, T, V)
        self._after = (eos, no_repeat_ngram_size, float(length_penalty), int(early_stopping))
        self._state = tuple(t.data_ptr() for t in (self.running, self.running_scores, self.finished,
                                                   self.finished_scores, self.is_finished, self.improvable,
                                                   self.source_rows, self.next_tokens, self.scratch))

    def __call__(self, logits: torch.Tensor, cur: int) -> bool:
        """logits (B*K, V) for position `cur` -> whether the search stops after this token."""
        if logits.shape != (self.B * self.K, self.V):
            raise ValueError(f"logits must be ({self.B * self.K}, {self.V}), got {tuple(logits.shape)}")
        logits = logits.detach().to("cpu", torch.float32).contiguous()
        code = self.lib.ldlm_beam_update(logits.data_ptr(), *self._settings, cur, *self._after, *self._state)
        if code < 0:
            row = -code - 1
            raise FloatingPointError(f"beam search: the decoder's logits hold NaN or inf at token {cur} of item "
                                     f"{row // self.K} (beam {row % self.K}); check the latent it decodes")
        return bool(code)


class RowGather:
    """In-place `t.copy_(t.index_select(0, rows))` for several contiguous CPU tensors in one C call, each changed
    row copied once (rows that keep their place not at all). Holds its scratch: the copy plan and a spare row."""

    def __init__(self):
        self.lib = library()
        self.scratch = torch.empty(0, dtype=torch.uint8)

    def __call__(self, tensors: list[torch.Tensor], rows: torch.Tensor) -> None:
        self.bind(tensors)(rows)

    def bind(self, tensors: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        """The gather for these tensors, checked and laid out once: call it with each step's rows (a beam search
        reorders the same cache every token; the checks and pointer tables cost as much as a small copy)."""
        R = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"RowGather takes contiguous CPU tensors; tensor {i}, {tuple(t.shape)} on "
                                 f"{t.device}, is not (pass .contiguous() on the CPU)")
        if any(t.shape[0] != R for t in tensors):
            raise ValueError(f"RowGather's tensors must have the same rows (first dimension), got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        row_bytes = [t[0].numel() * t.element_size() for t in tensors]
        need = 7 * 8 * R + 2 * max(row_bytes)  # the copy plan, spare rows
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need, dtype=torch.uint8)
        pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        sizes = (ctypes.c_int64 * len(tensors))(*row_bytes)
        lib, scratch, count = self.lib, self.scratch, len(tensors)

        def gather(rows: torch.Tensor) -> None:
            if rows.shape != (R,):
                raise ValueError(f"rows must be ({R},), got {tuple(rows.shape)}")
            rows = rows.to("cpu", torch.long).contiguous()
            if lib.ldlm_gather_rows(pointers, sizes, count, R, rows.data_ptr(), scratch.data_ptr(),
                                    torch.get_num_threads()):
                raise IndexError(f"rows must lie in [0, {R}), got {rows.tolist()}")

        gather.tensors = tensors  # the pointer table holds raw pointers: their memory lives as long as the gather
        return gather
