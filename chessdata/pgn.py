"""Reading lichess PGN: stream games out of `.pgn` / `.pgn.zst`, pull the `%eval` annotations,
replay the moves and return every evaluated position as board-state tuples (see encoding.py).

A lichess game is its header tags, a blank line, the whole movetext on one line, a blank line:
    1. e4 { [%eval 0.17] [%clk 0:03:00] } 1... c5 { [%eval 0.19] [%clk 0:03:00] } 2. Nf3 ... 0-1
`%eval` is in pawns from White's view (`#N`: White mates in N, `#-N`: Black does) and describes the
position after the move it follows.
"""

import codecs
import re
from collections.abc import Iterator
from pathlib import Path

import zstandard

from chessdata.replay import FastBoard, IllegalMove

RESULTS = ("1-0", "0-1", "1/2-1/2", "*")
_EVAL = re.compile(r"\[%eval\s+([^\]\s]+)\s*\]")
_HEADER = re.compile(r'^\[(\w+)\s+"(.*)"\]\s*$')
# One movetext token: a comment, a move number, a result, a NAG, a variation bracket, or a SAN.
_TOKEN = re.compile(r"\{[^}]*\}|\{|\d+\.(?:\.\.)?|1-0|0-1|1/2-1/2|\*|\$\d+|[()]|[^\s{}()$]+")
_MOVE_NUMBER = re.compile(r"\d+\.(?:\.\.)?$")
# Clean lichess movetext: an optional move number, a SAN (or the result), an optional comment.
_MOVE_AND_COMMENT = re.compile(r"(?:\d+\.(?:\.\.)?\s*)?([^\s{}()$]+)\s*(\{[^}]*\})?")


class BadGame(ValueError):
    """A game that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CorruptArchive(RuntimeError):
    """The compressed stream itself is broken; carries the file and the byte offset reached."""


CHUNK_BYTES = 1 << 20


def read_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of `.pgn.zst` (all frames) or `.pgn`, a chunk at a time: never the whole
    archive in memory. A corrupt or truncated archive raises CorruptArchive with the byte offset."""
    with open(path, "rb") as raw:
        if path.suffix != ".zst":
            while chunk := raw.read(CHUNK_BYTES):
                yield chunk
            return
        decompressor = zstandard.ZstdDecompressor()
        frame = decompressor.decompressobj()
        in_frame = False
        while chunk := raw.read(CHUNK_BYTES):
            while chunk:
                try:
                    out = frame.decompress(chunk)
                except zstandard.ZstdError as exc:
                    raise CorruptArchive(
                        f"{path}: corrupt zstd data in the {CHUNK_BYTES}-byte block "
                        f"ending at compressed byte {raw.tell()}: {exc}"
                    ) from None
                in_frame = True
                if out:
                    yield out
                chunk = b""
                if frame.eof:  # one frame done; lichess archives may hold several
                    chunk, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
        if in_frame:
            raise CorruptArchive(
                f"{path}: truncated zstd archive: it ends inside a frame at compressed byte {raw.tell()}"
            )


def iter_games(path: Path) -> Iterator[str]:
    """Yield each game's text. Games are cut where a blank line is followed by a header line, by
    str.split on whole chunks (C speed: the main process cuts every game of an archive). A piece
    with headers but no moves is joined to the next, so a game is always its headers, then moves.
    A game cut off mid-line (a damaged file) runs into the next one; both are then skipped as bad."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, headers_only = "", ""
    for chunk in read_chunks(path):
        pieces = (pending + decoder.decode(chunk)).split("\n\n[")
        pending = pieces.pop() if len(pieces) == 1 else "[" + pieces.pop()
        for i, piece in enumerate(pieces):
            game = headers_only + ("[" + piece if i else piece)
            if _has_movetext(game):
                headers_only = ""
                yield game + "\n\n"
            else:
                headers_only = game + "\n\n"
    game = (headers_only + pending).rstrip("\n")
    if game.strip():
        yield game + "\n\n"


def _has_movetext(game: str) -> bool:
    """Does anything but headers follow? Usually a blank line ends the headers; else look at lines."""
    at = game.find("\n\n")
    if at >= 0:
        return bool(game[at:].strip())
    return any(line.strip() and not line.startswith("[") for line in game.split("\n"))


def parse_headers(game: str) -> tuple[dict[str, str], str]:
    """Split a game into its header tags and its movetext (all non-header lines joined)."""
    headers, moves = {}, []
    for line in game.splitlines():
        match = _HEADER.match(line)
        if match:
            headers[match.group(1)] = match.group(2)
        elif line.strip():
            moves.append(line.strip())
    return headers, " ".join(moves)


def parse_eval(text: str) -> tuple[int, int]:
    """Lichess eval notation -> (centipawns, mate). `0.17` -> (17, 0); `#-3` -> (0, -3)."""
    if text.startswith("#"):
        mate = int(text[1:])
        if mate == 0:
            raise ValueError(f"mate in 0 is not an eval: {text!r}")
        return 0, mate
    return round(float(text) * 100), 0


def format_eval(cp: int, mate: int) -> str:
    """(centipawns, mate) -> lichess notation: `0.17`, `-1.50`, `#3`, `#-2`."""
    return f"#{mate}" if mate else f"{cp / 100:.2f}"


def movetext_pairs(movetext: str) -> list[tuple[str, str]]:
    """The movetext as (SAN or result, the comment after it or ""), variations and NAGs dropped."""
    pairs = _MOVE_AND_COMMENT.findall(movetext)
    # One regex covers clean lichess movetext; use it only when every character is accounted for:
    # no variations or NAGs, and every `{` is a comment that follows a move.
    if (
        "(" in movetext
        or ")" in movetext
        or "$" in movetext
        or movetext.count("{") != sum(1 for _, comment in pairs if comment)
    ):
        return _generic_pairs(movetext)
    return [(san, comment[1:-1]) for san, comment in pairs]


def _generic_pairs(movetext: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    depth = 0  # inside a (variation): skipped
    for token in _TOKEN.findall(movetext):
        if token.startswith("{"):
            if not token.endswith("}"):
                raise BadGame("broken_comment", "unclosed {")
            if depth == 0 and pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + token[1:-1])
        elif token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth < 0:
                raise BadGame("broken_variation")
        elif not (depth or token.startswith("$") or _MOVE_NUMBER.match(token)):
            pairs.append((token, ""))
    return pairs


_eval_cache: dict[str, tuple[int, int]] = {}


def game_positions(game: str) -> tuple[dict[str, str], list[tuple], list[int], list[int]]:
    """Replay one game; return its headers and, for every position that carries an eval,
    its board state, centipawns and mate. Raises BadGame for anything unusable."""
    headers, movetext = parse_headers(game)
    if "Variant" in headers and headers["Variant"] != "Standard" or "FEN" in headers:
        raise BadGame("variant")
    board = FastBoard()
    states, cps, mates = [], [], []
    result = None
    for ply, (san, comment) in enumerate(movetext_pairs(movetext)):
        if san in RESULTS:
            result = san
            break
        try:
            board.push_san(san.rstrip("!?") if san[-1] in "!?" else san)
        except IllegalMove:
            raise BadGame("illegal_move", f"{san} at ply {ply}") from None
        if comment and "%eval" in comment:
            match = _EVAL.search(comment)
            if match:
                text = match.group(1)
                value = _eval_cache.get(text)
                if value is None:
                    try:
                        value = parse_eval(text)
                    except ValueError:
                        raise BadGame("bad_eval", text) from None
                    if len(_eval_cache) < 100_000:
                        _eval_cache[text] = value
                states.append(board.state())
                cps.append(value[0])
                mates.append(value[1])
    if result is None:
        raise BadGame("missing_result")
    return headers, states, cps, mates
