"""How a checkpoint's bytes reach the disk and come back intact: written straight to a temporary name beside
the checkpoint (never staged in $TMPDIR), fsynced and renamed into place; a file's CRC-32s (a torch.save file is
a zip archive) and a folder's checksums.json verified before a resume trusts it; a file or folder that may be
anything read as data only (no pickled code runs); torch.distributed.checkpoint's failures as ordinary exceptions."""

import contextlib
import io
import json
import os
import pickle
import shutil
import zipfile
import zlib
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

CHECKSUMS = "checksums.json"


def folder_checksums(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): file_crc(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != CHECKSUMS
    }


def file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def verify(path: Path) -> None:
    """Raise if a checkpoint's bytes changed since it was written (bit rot, a bad copy), as a truncated one does,
    or if it holds more than data (UnsafeCheckpoint)."""
    if path.is_dir():
        recorded = json.loads((path / CHECKSUMS).read_text()) if (path / CHECKSUMS).exists() else None
        if recorded is not None and folder_checksums(path) != recorded:
            bad = sorted(set(folder_checksums(path).items()) ^ set(recorded.items()))
            raise ValueError(f"damaged: {bad[0][0]} does not match its checksum")
        require_data_only(path)
        return
    require_torch_save(path)
    with zipfile.ZipFile(path) as archive:
        try:
            bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"damaged: {exc}") from None
    if bad is not None:
        raise ValueError(f"damaged: {bad} does not match its CRC-32")
    require_data_only(path)


class DirectCheckpointIO(TorchCheckpointIO):
    """torch.save straight into the file `save` names (a temporary one beside the checkpoint, renamed once complete).
    Fabric's own writes an in-memory copy of the whole checkpoint to a staging file in $TMPDIR first: twice the
    memory, a full $TMPDIR fails the save, and a kill leaves the staging file there."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with open(path, "wb") as file:
            writer = RecordingWriter(file)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError:  # torch reports a failed write as "unexpected pos": give the OS's reason
                if writer.error is not None:
                    raise writer.error from None
                raise


class RecordingWriter:
    """A file whose write errors (a full disk) are kept for the message."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def write_directly(fabric) -> None:
    """Where Fabric writes a whole checkpoint through its CheckpointIO (one device, DDP), use DirectCheckpointIO.
    FSDP's strategies torch.save on rank 0 themselves."""
    from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

    if isinstance(fabric.strategy, (SingleDeviceStrategy, DDPStrategy)):
        fabric.strategy.checkpoint_io = DirectCheckpointIO()


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def replace(tmp: Path, path: Path) -> None:
    """os.replace, also where a folder is involved: the old one moves aside to `<name>.old` (which
    `resume_candidates` still offers, should a crash come before the new one is in place)."""
    if path.is_dir() or (tmp.is_dir() and path.exists()):
        old = path.with_name(path.name + ".old")
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        fsync(path.parent)
        remove(old)
    else:
        os.replace(tmp, path)
    fsync(path.parent)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for item in [*path.rglob("*"), path] if path.is_dir() else [path]:
        fsync(item)


@contextlib.contextmanager
def ordinary_errors():
    """torch's distributed checkpoint fails with a BaseException, which `except Exception` (the fallback
    to an older checkpoint, the one-line error) would not catch: re-raise its first rank's cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failure = next(iter(exc.failures.values()), None)
        cause = failure[0] if isinstance(failure, tuple) else failure
        detail = str(cause) or "a shard ends too early (damaged or cut short)"  # EOFError says nothing itself
        raise RuntimeError(f"{type(cause).__name__}: {detail}") from None


def require_torch_save(path: Path) -> None:
    """torch.save writes a zip archive: anything else (random bytes, a foreign pickle) is refused before unpickling."""
    if not path.exists():
        raise ValueError("no such file")
    with open(path, "rb"):  # unreadable: the OS's reason (zipfile would call it "not a zip file")
        pass
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            started = f.read(4) == b"PK\x03\x04"  # a zip archive's first bytes, without its end: cut short
        raise ValueError("truncated (its end is missing)" if started else "not a file torch.save wrote")


class UnsafeCheckpoint(ValueError):
    """A checkpoint that needs more than tensors and plain data to load: refused, none of its code run."""


TRUST_HINT = (
    "if it is a checkpoint of kibitz's previous format that you trust, convert it once with "
    "`python train.py convert-checkpoint --trust --ckpt OLD --out NEW` (that runs the file's code)"
)


def require_data_only(path: Path) -> None:
    """Refuse, without running any of it, a checkpoint file or folder that holds anything but tensors and plain
    data. Checked before every load: Fabric's own loads (FSDP's whole-file load, torch's reading of a folder's
    .metadata) unpickle without restriction, so they only ever see what passed here."""
    path = Path(path)
    if path.is_dir():
        if (path / ".metadata").is_file():
            dcp_metadata(path)
        if (path / "meta.pt").is_file():
            require_data_only(path / "meta.pt")
        return
    require_torch_save(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # a damaged archive
        raise ValueError(f"damaged ({type(exc).__name__}: {exc})") from None
    if unsafe:
        raise UnsafeCheckpoint(
            f"holds Python objects, not only tensors and plain data ({', '.join(sorted(unsafe)[:3])}); refused, "
            f"nothing of it was run; {TRUST_HINT}"
        )


def torch_file(path: Path):
    """A torch.save file as data only (weights_only: tensors, numbers, strings, lists, dicts), memory-mapped onto
    the CPU (tensors are read when used); random bytes, a damaged file or pickled objects are a clear error."""
    require_data_only(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # what the scan above let through and the safe loader still refused
        raise UnsafeCheckpoint(f"refused by torch's safe loader, nothing of it was run ({exc}); {TRUST_HINT}") from None


# What torch.distributed.checkpoint's .metadata pickle may name: its own metadata classes, torch sizes, dtypes and
# layouts, and the path it records. Calling any of them builds a value; none runs a program.
DCP_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in DCP_CLASSES or module == "torch.distributed.checkpoint.metadata"
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpoint(
                f".metadata names {module}.{name}, which torch's checkpoint format never needs; refused, nothing "
                "of it was run"
            )
        return super().find_class(module, name)


def dcp_metadata(folder: Path):
    """A sharded folder's .metadata (what torch's FileSystemReader reads with a plain pickle.load), read with an
    allow-list of the classes the format needs."""
    try:
        data = (folder / ".metadata").read_bytes()
        return DcpMetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # truncated, random bytes
        raise ValueError(f"damaged .metadata ({type(exc).__name__}: {exc})") from None
