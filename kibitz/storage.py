"""The one reader of checkpoints, and how their bytes reach the disk.

Reading: a checkpoint file or folder may come from anyone, so nothing of it is trusted before it is checked.
`verify` checks a whole checkpoint as data (CRC-32s, every pickle's globals, a folder's index and every file it
points at) before any load; the loads then read it with torch's weights-only unpickler, and a folder through a
reader and planner of kibitz's own that never unpickle anything else. Writing: straight to a temporary name beside
the checkpoint (never staged in $TMPDIR), fsynced and renamed into place; a run folder's files never via a link."""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

CHECKSUMS = "checksums.json"
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # what torch's FileSystemWriter names a rank's shard


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
    """Delete a file or a folder; a link is removed itself, never what it points at."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a run folder's file whole or not at all: into a new temporary file (never through a link planted under
    its name), then renamed over `path` (a link there is replaced, not followed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def open_in_place(path: Path, mode: str):
    """open(path, mode) for a file written where it is (appended to, locked), refusing a link (ELOOP)."""
    flags = {"a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a+": os.O_RDWR | os.O_APPEND | os.O_CREAT}[mode]
    return os.fdopen(os.open(path, flags | os.O_NOFOLLOW, 0o644), mode, newline="")


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


# ---------------------------------------------------------------- reading a checkpoint as data


def verify(path: Path, crc: bool = True):
    """Check a whole checkpoint file or folder as data before anything loads it; raise with the reason (damaged, cut
    short, not a checkpoint, or holding more than data: UnsafeCheckpoint). A folder's checked index comes back, for
    `load_shards` (None for a file). `crc=False`: what this process has just written, whose bytes are known."""
    path = Path(path)
    if path.is_dir():
        return check_folder(path, crc)
    check_file(path, crc)
    return None


def check_file(path: Path, crc: bool = True) -> None:
    """A torch.save file: a zip archive (torch's layout), every member matching its CRC-32, a pickle that names
    nothing but tensors and plain data."""
    if not path.exists():
        raise ValueError("no such file")
    with open(path, "rb") as f:  # unreadable: the OS's reason (zipfile would call it "not a zip file")
        started = f.read(4) == b"PK\x03\x04"  # a zip archive's first bytes
    if not zipfile.is_zipfile(path):
        raise ValueError("truncated (its end is missing)" if started else "not a file torch.save wrote")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
                raise ValueError("a zip archive, but not one torch.save wrote (no data.pkl in it)")
            bad = archive.testzip() if crc else None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"damaged ({exc})") from None
    if bad is not None:
        raise ValueError(f"damaged: {bad} does not match its CRC-32")
    require_data_only(path)


class UnsafeCheckpoint(ValueError):
    """A checkpoint that needs more than tensors and plain data to load: refused, none of its code run."""


TRUST_HINT = (
    "if it is a checkpoint of kibitz's previous format that you trust, convert it once with "
    "`python train.py convert-checkpoint --trust --ckpt OLD --out NEW` (that runs the file's code)"
)


def require_data_only(path: Path) -> None:
    """Refuse, without running any of it, a torch.save file whose pickle names anything but tensors and plain data."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # a damaged archive
        raise ValueError(f"damaged ({type(exc).__name__}: {exc})") from None
    if unsafe:
        raise UnsafeCheckpoint(
            f"holds Python objects, not only tensors and plain data ({', '.join(sorted(unsafe)[:3])}); refused, "
            f"nothing of it was run; {TRUST_HINT}"
        )


def torch_file(path: Path, checked: bool = False, crc: bool = True):
    """A torch.save file as data only (weights_only: tensors, numbers, strings, lists, dicts), memory-mapped onto
    the CPU (tensors are read when used), checked first unless the caller just did (`crc=False`: all but the CRCs)."""
    if not checked:
        check_file(Path(path), crc)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # what the scan let through and the safe loader still refused
        raise UnsafeCheckpoint(f"refused by torch's safe loader, nothing of it was run ({exc}); {TRUST_HINT}") from None


def check_folder(folder: Path, crc: bool = True):
    """A folder of shards: regular files only (no link is followed), no rank-local index, `.metadata` present, the
    checksums matching, `.metadata` read by the allow-list unpickler, every item it indexes inside a
    shard of this folder, every non-tensor item and `meta.pt` plain data. Returns the checked index."""
    sizes = {}
    for entry in os.scandir(folder):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise ValueError(f"{entry.name} is a link or not a regular file (a checkpoint folder holds files only)")
        if entry.name.endswith(".metadata") and entry.name != ".metadata":
            raise UnsafeCheckpoint(
                f"{entry.name} is a rank-local index, which kibitz never writes and torch would unpickle without "
                "restriction; refused, nothing of it was run"
            )
        sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    if ".metadata" not in sizes:
        raise ValueError("no .metadata (the index of the shards) in the folder")
    if CHECKSUMS in sizes and crc:
        compare_checksums(folder, [name for name in sizes if name != CHECKSUMS])
    metadata = dcp_metadata(folder)
    check_index(metadata, sizes)
    check_bytes_items(folder, metadata)
    if "meta.pt" in sizes:  # the run's config and progress (a folder of weights alone has none)
        check_file(folder / "meta.pt", crc)
    return metadata


def compare_checksums(folder: Path, names: list[str]) -> None:
    try:
        recorded = json.loads(read_no_follow(folder / CHECKSUMS))
    except ValueError:
        raise ValueError(f"damaged: {CHECKSUMS} is not JSON") from None
    found = {name: file_crc(folder / name) for name in sorted(names)}
    if not isinstance(recorded, dict) or found != recorded:
        recorded = recorded if isinstance(recorded, dict) else {}
        bad = sorted(name for name in {*found, *map(str, recorded)} if found.get(name) != recorded.get(name))
        raise ValueError(f"damaged: {bad[0]} does not match its checksum")


def folder_checksums(folder: Path) -> dict[str, str]:
    """{file name: CRC-32} of a folder of shards, as `checksums.json` records them."""
    return {f.name: file_crc(f) for f in sorted(folder.iterdir()) if f.name != CHECKSUMS}


def file_crc(path: Path) -> str:
    crc = 0
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def read_no_follow(path: Path) -> bytes:
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        return f.read()


# What torch.distributed.checkpoint's .metadata pickle names (torch 2.4 to 2.13), as exact (module, name) pairs;
# calling any of them builds a value, none runs a program. torch's dtypes (torch.float32, ...) are allowed by value.
DCP_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # where Python 3.13 keeps it
    ("collections", "OrderedDict"),
}


class DcpMetadataUnpickler(pickle.Unpickler):
    """Only the exact names above; a dotted name (pickle's route to whatever a module imports) is refused."""

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in DCP_CLASSES:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise UnsafeCheckpoint(
            f".metadata names {module}.{name}, which torch's checkpoint format never needs; refused, nothing of it "
            "was run"
        )


def dcp_metadata(folder: Path):
    """A folder's .metadata (which torch's own reader would unpickle without restriction) read with the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = DcpMetadataUnpickler(io.BytesIO(read_no_follow(folder / ".metadata"))).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # truncated, random bytes
        raise ValueError(f"damaged .metadata ({type(exc).__name__}: {exc})") from None
    if type(metadata) is not Metadata:
        raise ValueError(f".metadata holds a {type(metadata).__name__}, not torch's checkpoint index")
    return metadata


def check_index(metadata, sizes: dict[str, int]) -> None:
    """Every item the index names is a tensor or a value, stored in a shard of this folder, within the file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    items, places = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(items, dict) or not isinstance(places, dict):
        raise ValueError(".metadata: its index is not a table of items")
    for name, item in items.items():
        if not isinstance(name, str) or type(item) not in (TensorStorageMetadata, BytesStorageMetadata):
            raise ValueError(f".metadata: item {name!r} is neither a tensor nor a value")
    for index, place in places.items():
        if type(index) is not MetadataIndex or type(place) is not _StorageInfo:
            raise ValueError(".metadata: a storage entry is not torch's (index, place) pair")
        file, offset, length = place.relative_path, place.offset, place.length
        if not isinstance(file, str) or not SHARD_FILE.fullmatch(file) or file not in sizes:
            raise ValueError(f".metadata points {index.fqn} at {file!r}, which is not a shard file of this folder")
        if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length <= sizes[file] - offset):
            raise ValueError(f".metadata: {index.fqn} lies outside {file} (damaged, or cut short)")
        if place.transform_descriptors:
            raise ValueError(f".metadata: {index.fqn} asks for transforms ({place.transform_descriptors}), never used")


def check_bytes_items(folder: Path, metadata) -> None:
    """The non-tensor items (an optimizer's hyperparameters): torch.save'd values that must be plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, place in metadata.storage_data.items():
        if type(metadata.state_dict_metadata.get(index.fqn)) is not BytesStorageMetadata:
            continue
        with os.fdopen(os.open(folder / place.relative_path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            f.seek(place.offset)
            value = io.BytesIO(f.read(place.length))
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeCheckpoint(
                f"{index.fqn} in {place.relative_path} holds Python objects, not plain data; refused, nothing of it "
                "was run"
            ) from None
        except Exception as exc:
            raise ValueError(f"damaged: {index.fqn} in {place.relative_path} ({type(exc).__name__}: {exc})") from None


def load_shards(folder: Path, state: dict, metadata, partial: bool = False) -> None:
    """torch.distributed.checkpoint's load of `state` (filled in place, resharded to this process group) from a
    folder `check_folder` checked, through kibitz's reader and planner. `partial`: names the folder lacks are left."""
    import torch.distributed.checkpoint as dcp

    with ordinary_errors(), without_process_group_warning():
        dcp.load(state, storage_reader=shard_reader(folder, metadata), planner=data_only_planner(partial))


def read_shards(folder: Path, metadata) -> dict:
    """Every item of a checked folder of shards, whole, in this process (export-checkpoint)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class WholePlanner(DataOnlyBytes, _EmptyStateDictLoadPlanner):
        pass

    state = {}
    with ordinary_errors():
        _load_state_dict(state, storage_reader=shard_reader(folder, metadata), planner=WholePlanner(), no_dist=True)
    return state


class DataOnlyBytes:
    """A load planner's reading of a non-tensor item with torch's weights-only unpickler (torch's own planner uses the
    unrestricted one)."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        data = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], data)
        else:
            self.state_dict[read_item.dest_index.fqn] = data


def data_only_planner(partial: bool):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class DataOnlyPlanner(DataOnlyBytes, DefaultLoadPlanner):
        pass

    return DataOnlyPlanner(allow_partial_load=partial)


def shard_reader(folder: Path, metadata):
    """torch's FileSystemReader given the index `check_folder` read: it never unpickles a .metadata itself, never
    falls back to a rank-local one (its read_metadata takes no `rank`), and opens no file through a link."""
    from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class NoFollow(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as stream:
                yield stream

    class Reader(FileSystemReader):
        def reset(self, checkpoint_id=None) -> None:
            super().reset(None)  # the folder that was checked, whatever torch is told

        def read_metadata(self):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = Reader(folder)
    reader.fs = NoFollow()
    return reader


@contextlib.contextmanager
def without_process_group_warning():
    """torch warns that it reads a folder of shards without a process group: that is the point here. Silenced for
    this read only: the caller's warning filters stay as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
