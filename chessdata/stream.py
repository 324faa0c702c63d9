"""Reading source files as a stream: bytes out of `.zst` (all frames) or plain files, and text with every
line-ending style turned into `\\n` and byte-order marks dropped, a chunk at a time, never the whole file."""

import codecs
import hashlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

READ_BYTES = 1 << 20  # read from disk per call
FEED_BYTES = 1 << 14  # handed to zstd per call: an error then points at a 16 KiB window, not a 1 MiB one


class CorruptArchive(RuntimeError):
    """The compressed stream itself is broken; the message names the file and the byte offsets."""


class Progress:
    """How far a reader has got into a file: the bytes it has taken in and a running hash of them. A shard of
    prepared output records the mark of the input it was cut from, so a re-run reuses it only when the file is
    the same up to there (a repaired download keeps its finished shards, a replaced file loses them)."""

    def __init__(self):
        self.bytes = 0
        self._digest = hashlib.blake2b(digest_size=16)

    def update(self, data) -> None:
        self.bytes += len(data)
        self._digest.update(data)

    def mark(self) -> str:
        return f"{self.bytes}:{self._digest.copy().hexdigest()}"


def fingerprint(path: Path, sample_bytes: int = 1 << 20) -> dict:
    """A file's size and a hash of three samples (start, middle, end): a replaced or regrown file is told apart
    without reading a 30 GB archive through."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for at in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
            handle.seek(at)
            digest.update(handle.read(sample_bytes))
    return {"path": str(path), "bytes": size, "sampled_blake2b": digest.hexdigest()}


def read_chunks(path: Path, progress: Progress | None = None) -> Iterator[bytes]:
    """Decompressed bytes of a `.zst` file (all frames; lichess archives may hold several) or a plain file.
    A corrupt or truncated archive raises CorruptArchive naming the compressed bytes where zstd failed."""
    progress = progress or Progress()
    with open(path, "rb") as raw:
        if path.suffix != ".zst":
            while chunk := raw.read(READ_BYTES):
                progress.update(chunk)
                yield chunk
            return
        decompressor = zstandard.ZstdDecompressor()
        frame, in_frame = decompressor.decompressobj(), False
        consumed = 0  # compressed bytes handed to zstd so far
        good = 0  # where the last piece that produced output began: the damage lies after it
        out: list[bytes] = []  # yielded once READ_BYTES are there: memory stays bounded at any compression ratio
        held = 0
        while block := raw.read(READ_BYTES):
            view = memoryview(block)
            for start in range(0, len(block), FEED_BYTES):
                data = view[start : start + FEED_BYTES]
                end = consumed + len(data)
                progress.update(data)
                while data:
                    try:
                        text = frame.decompress(data)
                    except zstandard.ZstdError as exc:
                        # zstd checks a block (up to 128 KiB) once it holds all of it: this is as close as it can say
                        raise CorruptArchive(
                            f"{path}: corrupt zstd data between compressed bytes {good} and {end}: {exc}"
                        ) from None
                    in_frame = True
                    if text:
                        out.append(text)
                        held += len(text)
                        good = consumed
                        if held >= READ_BYTES:
                            yield b"".join(out)
                            out, held = [], 0
                    data = b""
                    if frame.eof:  # one frame done; the rest of the piece starts the next
                        data, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
                consumed = end
        if out:
            yield b"".join(out)
        if in_frame:
            raise CorruptArchive(
                f"{path}: truncated zstd archive: it ends inside a frame at compressed byte {consumed}"
            )


def read_text(path: Path, progress: Progress | None = None) -> Iterator[str]:
    """The file's text a chunk at a time: UTF-8 (undecodable bytes replaced), `\\r\\n` and lone `\\r` as `\\n`,
    byte-order marks removed (a BOM opens many files saved on Windows, and concatenated files hold several)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""  # a chunk's final \r waits: the next chunk may begin with its \n
    for chunk in read_chunks(path, progress):
        text = held + decoder.decode(chunk)
        held = ""
        if "\r" in text:
            if text.endswith("\r"):
                text, held = text[:-1], "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\ufeff" in text:
            text = text.replace("\ufeff", "")
        if text:
            yield text
    text = held + decoder.decode(b"", final=True)
    if text:
        yield text.replace("\r", "\n").replace("\ufeff", "")
