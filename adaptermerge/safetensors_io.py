"""A strict safetensors reader and a deterministic, atomic, streaming safetensors writer.

Why not just ``safetensors.safe_open`` / ``save_file``?

* Reading: adapters come from strangers. The header is validated here *before* any tensor is allocated (header
  length against the file size, JSON shape, known dtypes, byte lengths against shapes, offsets inside the file and
  not overlapping), so a crafted header cannot make us allocate what the file does not contain. Tensors are then
  read one at a time by offset, so memory is bounded by the tensors a caller holds.
* Writing: ``safetensors`` serialises ``__metadata__`` from a hash map whose order changes from run to run, so the
  same merge would give different bytes. This writer emits a canonical header (sorted keys, no whitespace), spools
  tensor data to a temporary file beside the destination while the merge runs, and renames into place only when
  everything is on disk: a crash or a full disk never leaves a partial file under the output name.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

import torch

from .errors import InputError, OutputError

# safetensors dtype string -> (torch dtype, item size in bytes)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

#: A header larger than this is refused: real adapters have headers of a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Tensors with more dimensions than this are refused (LoRA factors have 2).
MAX_NDIM = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (offsets are absolute file positions)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    file_size: int


def open_regular(p: Path) -> BinaryIO:
    """Open ``p`` read-only, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of blocking forever waiting for a writer; the
    ``fstat`` then refuses FIFOs, sockets, devices (``/dev/zero`` never ends) and directories.
    """
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise InputError(f"{p}: cannot open: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "is a directory, expected a .safetensors file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise InputError(f"{p}: {what}")
    return os.fdopen(fd, "rb")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises :class:`InputError` naming the file (and tensor) for every way a file can be broken or hostile.
    """
    p = Path(path)
    if p.suffix.lower() in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}:
        raise InputError(
            f"{p}: pickle-based checkpoints are never unpickled (they can run code); convert it to safetensors "
            f"in a trusted environment, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'x.safetensors')"
        )
    fh = open_regular(p)
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise InputError(f"{p}: empty file, not a safetensors file")
        if size < 8:
            raise InputError(f"{p}: truncated safetensors file ({size} bytes, header length needs 8)")
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise InputError(f"{p}: safetensors header claims {n} bytes but the file has only {size - 8} after it (truncated or not safetensors)")
        if n > MAX_HEADER_BYTES:
            raise InputError(f"{p}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, integers over the digit limit, absurd nesting
        raise InputError(f"{p}: safetensors header is not valid JSON (corrupt or not a safetensors file)") from None
    if not isinstance(header, dict):
        raise InputError(f"{p}: safetensors header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{p}: safetensors __metadata__ must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        where = f"{p}: tensor '{name}'"
        if not isinstance(info, dict):
            raise InputError(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(f"{where}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        ):
            raise InputError(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InputError(f"{where}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise InputError(f"{where}: invalid data_offsets {offsets!r}")
        if end > data_len:
            raise InputError(f"{where}: data runs past the end of the file (offset {end} > {data_len} data bytes; truncated?)")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise InputError(f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {end - begin}")
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InputError(f"{p}: tensors '{n0}' and '{n1}' overlap in the file")
    return SafetensorsHeader(p, metadata, entries, size)


#: Where a cgroup v2 / v1 memory limit is read from.
CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@functools.lru_cache(maxsize=1)
def memory_limit_bytes() -> int:
    """The most memory this process could ever get: physical RAM, capped by a cgroup limit and ``RLIMIT_AS``.

    A deterministic bound (not "free memory now"), used to refuse at once what can never fit instead of letting a
    crafted file drive the machine into swap or the OOM killer. Read once per process (it is asked for every
    tensor read; ``memory_limit_bytes.cache_clear()`` re-reads it).
    """
    limits: list[int] = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for f in CGROUP_MEMORY_FILES:
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit():  # "max" (cgroup v2) means no limit
            limits.append(int(v))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else 1 << 62


def gib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB"


def read_tensor(header: SafetensorsHeader, name: str, fh: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor's bytes (and only those) from the file described by ``header``.

    A tensor larger than :func:`memory_limit_bytes` is refused before anything is allocated (the header was checked
    against the file size, but a sparse file can be as large as it claims).
    """
    e = header.tensors[name]
    torch_dtype, _ = DTYPES[e.dtype]
    nbytes = e.end - e.start
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise InputError(f"{header.path}: tensor '{name}' is {gib(nbytes)}, more than the {gib(limit)} of memory this process can have")
    buf = bytearray(nbytes)
    own = fh is None
    try:
        if own:
            fh = open_regular(header.path)
        fh.seek(e.start)
        got = fh.readinto(buf)
    except OSError as err:
        raise InputError(f"{header.path}: tensor '{name}': read failed: {err.strerror or err}") from None
    finally:
        if own and fh is not None:
            fh.close()
    if got != nbytes:
        raise InputError(f"{header.path}: tensor '{name}': file changed or truncated while reading")
    if nbytes == 0:
        return torch.empty(e.shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(e.shape)


def canonical_header(entries: Mapping[str, tuple[str, tuple[int, ...], int, int]], metadata: Mapping[str, str]) -> bytes:
    """The header bytes for ``entries`` (name -> (dtype, shape, begin, end)), canonical and 8-byte aligned."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for name in sorted(entries):
        dtype, shape, b, e = entries[name]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [b, e]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def canonical_sha256(header: SafetensorsHeader) -> str:
    """sha256 of the file's canonical form: :func:`canonical_header` (sorted names and metadata) then every tensor's
    bytes in name order, which is exactly what :class:`SafetensorsWriter` would write for the same content.

    It does not depend on the order of tensors or header keys in the file, and equals ``sha256sum`` of files already
    in canonical layout (adaptermerge outputs; ``safetensors.save_file`` output with a single dtype).
    """
    names = sorted(header.tensors)
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    offset = 0
    for n in names:
        e = header.tensors[n]
        entries[n] = (e.dtype, e.shape, offset, offset + e.end - e.start)
        offset += e.end - e.start
    h = hashlib.sha256(canonical_header(entries, header.metadata))
    with open_regular(header.path) as fh:
        for n in names:
            e = header.tensors[n]
            fh.seek(e.start)
            left = e.end - e.start
            while left:
                chunk = fh.read(min(left, 1 << 22))
                if not chunk:
                    raise InputError(f"{header.path}: tensor '{n}': file changed or truncated while reading")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a tensor (what safetensors stores)."""
    t = t.detach().contiguous().cpu().reshape(-1)  # (0-dim scalars, e.g. kohya's alpha, cannot be viewed as bytes)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()


#: Every temporary file or folder adaptermerge creates starts with this.
TEMP_PREFIX = ".adaptermerge-tmp-"
_TEMP_RE = re.compile(r"^\.adaptermerge-tmp-(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})-")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_prefix(kind: str = "") -> str:
    """``.adaptermerge-tmp-<pid>-<host hash>-<kind>``: who owns a temporary can be told from its name alone."""
    return f"{TEMP_PREFIX}{os.getpid()}-{_host_tag()}-{kind}"


def _pid_alive(pid: int) -> bool:
    """False only when ``pid`` certainly is not running (no such process, or a zombie that can no longer write)."""
    if pid <= 0 or os.name == "nt":  # on Windows os.kill(pid, 0) would send CTRL_C_EVENT: never probe there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed adaptermerge process left in ``folder``; returns what was removed.

    Only names ``.adaptermerge-tmp-<pid>-<host>-*`` whose host hash is this machine's and whose pid is not a running
    process (and not this process) are touched, so concurrent merges into the same folder, from this machine or
    from another one sharing it, never lose their files. Anything else is left alone.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    me, host = os.getpid(), _host_tag()
    for name in sorted(names):
        m = _TEMP_RE.match(name)
        if m is None or m["host"] != host or int(m["pid"]) == me or _pid_alive(int(m["pid"])):
            continue
        p = Path(folder) / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:  # raced with another cleaner, or not ours to remove after all
            pass
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def apply_umask(fd_or_path: int | str | os.PathLike, *, directory: bool = False) -> None:
    """Give an output made by mkstemp/mkdtemp (0600/0700) the mode any new file gets: 0666 & ~umask for files,
    0777 & ~umask for folders, as cp, tar or torch.save would give it."""
    mode = (0o777 if directory else 0o666) & ~current_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def _copy_file(src: BinaryIO, dst: BinaryIO, nbytes: int) -> None:
    """Append the first ``nbytes`` of ``src`` to ``dst`` (both flushed), in the kernel where it can
    (``copy_file_range``: no copy through Python, a reflink on file systems that have them), else chunk by chunk."""
    src.seek(0)
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM) or done:
                raise
    if done < nbytes:
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        while done < nbytes and (chunk := src.read(min(1 << 24, nbytes - done))):
            dst.write(chunk)
            done += len(chunk)
        dst.flush()
    if done != nbytes:
        raise OSError(errno.EIO, f"short copy ({done} of {nbytes} bytes)")


class SafetensorsWriter:
    """Stream tensors into a safetensors file that appears at ``path`` only once complete.

    Tensor data goes to a spool file beside ``path`` while tensors are added; :meth:`commit` writes the canonical
    header plus the data to a second temporary file, fsyncs it and renames it over ``path``. :meth:`abort` (or leaving
    a ``with`` block by an exception) removes every temporary file. Temporary names are :func:`temp_prefix` + random
    characters, so a later run can remove those of a killed process (:func:`clean_stale_temps`).
    """

    def __init__(self, path: str | os.PathLike, *, display: str | os.PathLike | None = None):
        self.path = Path(path)
        self.display = str(display) if display is not None else str(self.path)  # the name errors give the user
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._offset = 0
        try:
            fd, spool = tempfile.mkstemp(prefix=temp_prefix(), suffix=".spool", dir=self.path.parent)
        except OSError as e:
            raise OutputError(f"{self.display}: cannot create a file in {self.path.parent}: {e.strerror or e}") from None
        self._spool_path = Path(spool)
        self._spool = os.fdopen(fd, "w+b")
        self._final_tmp: Path | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"tensor '{name}' added twice")
        if tensor.dtype not in TORCH_TO_ST:
            raise ValueError(f"tensor '{name}': dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor_bytes(tensor)
        try:
            self._spool.write(data)
        except OSError as e:
            raise OutputError(f"{self.display}: write failed: {e.strerror or e}") from None
        self._entries[name] = (TORCH_TO_ST[tensor.dtype], tuple(tensor.shape), self._offset, self._offset + len(data))
        self._offset += len(data)

    def commit(self, metadata: Mapping[str, str] | None = None, *, rename: bool = True) -> Path:
        """Write header + data to a temporary file and (by default) rename it to ``path``. Returns the file written."""
        head = canonical_header(self._entries, dict(metadata or {}))
        try:
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".safetensors", dir=self.path.parent)
            self._final_tmp = Path(tmp)
            apply_umask(fd)  # mkstemp makes 0600; the output is an ordinary file
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                out.flush()
                self._spool.flush()
                _copy_file(self._spool, out, self._offset)
                os.fsync(out.fileno())
            self._close_spool()
            if not rename:
                return self._final_tmp
            os.replace(self._final_tmp, self.path)
            self._final_tmp = None
            return self.path
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.display}: write failed: {e.strerror or e}") from None

    def _close_spool(self) -> None:
        try:
            if not self._spool.closed:
                self._spool.close()  # may flush buffered data, and fail on a full disk
        finally:
            self._spool_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Remove every temporary file; never raises (it runs while another error propagates)."""
        try:
            self._close_spool()
        except OSError:
            pass
        if self._final_tmp is not None:
            try:
                self._final_tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._final_tmp = None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self._close_spool()
