"""How a checkpoint's bytes reach the disk and come back intact: written straight to a temporary name beside
the checkpoint (never staged in $TMPDIR), fsynced and renamed into place; a file's CRC-32s (a torch.save file is
a zip archive) and a folder's checksums.json verified before a resume trusts it; torch.load of a file that may
be anything; torch.distributed.checkpoint's failures as ordinary exceptions."""

import contextlib
import json
import os
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
    """Raise if a checkpoint's bytes changed since it was written (bit rot, a bad copy), as a truncated one does."""
    if path.is_dir():
        recorded = json.loads((path / CHECKSUMS).read_text()) if (path / CHECKSUMS).exists() else None
        if recorded is not None and folder_checksums(path) != recorded:
            bad = sorted(set(folder_checksums(path).items()) ^ set(recorded.items()))
            raise ValueError(f"damaged: {bad[0][0]} does not match its checksum")
        return
    require_torch_save(path)
    with zipfile.ZipFile(path) as archive:
        try:
            bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"damaged: {exc}") from None
    if bad is not None:
        raise ValueError(f"damaged: {bad} does not match its CRC-32")


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
        raise RuntimeError(f"{type(cause).__name__}: {cause}") from None


def require_torch_save(path: Path) -> None:
    """torch.save writes a zip archive: anything else (random bytes, a foreign pickle) is refused before unpickling."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a file torch.save wrote")


def torch_file(path: Path):
    """torch.load, memory-mapped onto the CPU (tensors are read when used); random bytes are a clear error."""
    require_torch_save(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
