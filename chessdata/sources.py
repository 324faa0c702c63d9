"""Position-only sources, beside lichess game archives (pgn.py):

  evaldb  lichess_db_eval.jsonl(.zst): one JSON object per line, {"fen": "<4 FEN fields>",
          "evals": [{"knodes", "depth", "pvs": [{"cp" | "mate", "line"}]}]}; the deepest eval's
          first line is taken (cp in centipawns, White's view)
  sqlite  .db / .sqlite / .sqlite3: a table with `fen` and `eval` columns, as in the widely shared
          37M-position lichess evaluations database (eval in pawns; mates stored as large values,
          kept as such: the clamp maps them to +-clamp)
  csv     .csv(.zst): `fen,eval` rows, eval in pawns or `#N`; a header row is allowed

A record that cannot be used is skipped and counted by reason; positions are split by a hash of
their FEN's first four fields, so a position always lands in the same split.
"""

import collections
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import chess
import numpy as np

from chessdata import evals
from chessdata.encoding import board_state, pack_states
from chessdata.folder import SPLITS, split_of
from chessdata.stream import Progress, fingerprint, read_text

KINDS = {".pgn": "pgn", ".jsonl": "evaldb", ".db": "sqlite", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".csv": "csv"}


class BadRecord(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def kind_of(path: Path) -> str:
    suffixes = path.suffixes[-2:] if path.suffix == ".zst" else path.suffixes[-1:]
    kind = KINDS.get(suffixes[0] if suffixes else "")
    if kind is None or (kind == "sqlite" and path.suffix == ".zst"):
        raise SystemExit(
            f"error: {path}: unknown source type (expected .pgn, .jsonl, .csv (each optionally .zst), or an SQLite .db)"
        )
    return kind


def iter_lines(path: Path, progress: Progress | None = None) -> Iterator[str]:
    """Non-blank lines, any line-ending style, BOMs dropped."""
    pending = ""
    for text in read_text(path, progress):
        *lines, pending = (pending + text).split("\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def sqlite_rows(path: Path) -> Iterator[tuple]:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        raise SystemExit(f"error: {path}: cannot be read as an SQLite database ({exc})") from None
    try:
        columns = {t: {row[1] for row in connection.execute(f"PRAGMA table_info({quoted(t)})")} for t in tables}
        usable = [t for t in tables if {"fen", "eval"} <= columns[t]]
        if len(usable) != 1:
            raise SystemExit(
                f"error: {path}: expected one table with `fen` and `eval` columns, found {usable or tables}"
            )
        yield from connection.execute(f"SELECT fen, eval FROM {quoted(usable[0])}")
    except sqlite3.DatabaseError as exc:  # damaged pages found while reading
        raise SystemExit(f"error: {path}: a damaged SQLite database ({exc})") from None
    finally:
        connection.close()


def quoted(name: str) -> str:
    """An SQL identifier, whatever characters the table's name holds."""
    return '"' + name.replace('"', '""') + '"'


def iter_records(path: Path, kind: str, progress: Progress | None = None) -> Iterator:
    if kind != "sqlite":
        return iter_lines(path, progress)
    if progress is not None:  # a database is read by SQLite, not as a stream: the whole file stands for its rows
        progress.update(json.dumps(fingerprint(path)).encode())
    return sqlite_rows(path)


def evaldb_record(line: str) -> tuple[str, object, object]:
    """(FEN, cp, mate) of the deepest eval's first line; checked against the board later (a mate of 0 needs
    the side to move)."""
    try:
        item = json.loads(line)
        deepest = max(item["evals"], key=lambda e: (e.get("depth", 0), e.get("knodes", 0)))
        pv = deepest["pvs"][0]
        fen = item["fen"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise BadRecord("bad_json") from None
    if not isinstance(fen, str) or not isinstance(pv, dict) or ("mate" not in pv and "cp" not in pv):
        raise BadRecord("bad_json")
    return fen, pv.get("cp"), pv.get("mate")


def sqlite_record(row: tuple) -> tuple[str, str | float, None]:
    fen, value = row
    if not isinstance(fen, str) or not isinstance(value, (int, float)):
        raise BadRecord("bad_row")
    return fen, float(value), None


def csv_record(line: str) -> tuple[str, str, None]:
    fen, comma, value = line.rpartition(",")
    if not comma:
        raise BadRecord("bad_row")
    if fen.strip().lower() == "fen":
        raise BadRecord("header")
    return fen.strip(), value.strip(), None


READERS = {"evaldb": evaldb_record, "sqlite": sqlite_record, "csv": csv_record}


def eval_of(kind: str, cp, mate, board: chess.Board) -> tuple[int, int]:
    """The stored (centipawns, mate) of one record; raises evals.BadEval for what does not fit.

    evaldb: integer cp or mate (mate 0: the side to move is mated). sqlite: pawns, any finite float. csv: pawns
    (any float notation) or the `#N` of a PGN `%eval`."""
    black_to_move = board.turn == chess.BLACK
    if kind == "evaldb":
        return evals.checked(cp, mate, black_to_move)
    if kind == "csv" and cp.startswith("#"):
        return evals.read_eval(cp, black_to_move)
    try:
        pawns = float(cp)
    except ValueError:
        raise evals.BadEval(f"not an eval: {cp!r}") from None
    return evals.pawns_to_cp(pawns), 0


def position_split(fen: str, board: chess.Board, val_fraction: float, test_fraction: float) -> str:
    """A position's split, by its FEN's first four fields with the en-passant square only where a capture is
    legal (as python-chess writes FENs): one position lands in one split whichever way its FEN was written."""
    fields = fen.split()[:4]
    if len(fields) == 4 and fields[3] != "-" and not board.has_legal_en_passant():
        fields[3] = "-"
    return split_of(" ".join(fields), val_fraction, test_fraction)


def parse_position_chunk(kind: str, records: list, filters) -> tuple[dict, collections.Counter, collections.Counter]:
    """Like prepare.parse_chunk, for position records."""
    rows = {split: ([], [], []) for split in SPLITS}
    kept: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    read = READERS[kind]
    for record in records:
        try:
            fen, cp, mate = read(record)
            try:
                board = chess.Board(fen if len(fen.split()) > 4 else fen + " 0 1")  # eval-db FENs lack the clocks
            except ValueError:
                raise BadRecord("bad_fen") from None
            if not board.is_valid():
                raise BadRecord("invalid_position")
            cp, mate = eval_of(kind, cp, mate, board)
        except BadRecord as bad:
            if bad.reason != "header":
                skipped[bad.reason] += 1
            continue
        except evals.BadEval:
            skipped["bad_eval"] += 1
            continue
        split = position_split(fen, board, filters.val_fraction, filters.test_fraction)
        kept[split] += 1
        for column, value in zip(rows[split], (board_state(board), cp, mate)):
            column.append(value)
    arrays = {
        split: {"positions": pack_states(s), "cp": np.array(c, dtype=np.int32), "mate": np.array(m, dtype=np.int16)}
        for split, (s, c, m) in rows.items()
    }
    return arrays, kept, skipped
