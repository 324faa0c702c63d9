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

import codecs
import collections
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import chess
import numpy as np

from chessdata.encoding import board_state, pack_states
from chessdata.folder import SPLITS, split_of
from chessdata.pgn import parse_eval, read_chunks

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


def iter_lines(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in read_chunks(path):
        *lines, pending = (pending + decoder.decode(chunk)).split("\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def sqlite_rows(path: Path) -> Iterator[tuple]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        usable = [
            t for t in tables if {"fen", "eval"} <= {row[1] for row in connection.execute(f'PRAGMA table_info("{t}")')}
        ]
        if len(usable) != 1:
            raise SystemExit(
                f"error: {path}: expected one table with `fen` and `eval` columns, found {usable or tables}"
            )
        yield from connection.execute(f'SELECT fen, eval FROM "{usable[0]}"')
    finally:
        connection.close()


def iter_records(path: Path, kind: str) -> Iterator:
    return sqlite_rows(path) if kind == "sqlite" else iter_lines(path)


def evaldb_record(line: str) -> tuple[str, int, int]:
    try:
        item = json.loads(line)
        deepest = max(item["evals"], key=lambda e: (e.get("depth", 0), e.get("knodes", 0)))
        pv = deepest["pvs"][0]
        fen = item["fen"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadRecord("bad_json") from None
    if "mate" in pv:
        return fen, 0, int(pv["mate"])
    if "cp" in pv:
        return fen, int(pv["cp"]), 0
    raise BadRecord("bad_json")


def sqlite_record(row: tuple) -> tuple[str, int, int]:
    fen, value = row
    if not isinstance(fen, str) or not isinstance(value, (int, float)):
        raise BadRecord("bad_row")
    return fen, round(value * 100), 0


def csv_record(line: str) -> tuple[str, int, int]:
    fen, _, value = line.rpartition(",")
    try:
        cp, mate = parse_eval(value.strip())
    except ValueError:
        raise BadRecord("header" if fen.strip().lower() == "fen" else "bad_row") from None
    return fen.strip(), cp, mate


READERS = {"evaldb": evaldb_record, "sqlite": sqlite_record, "csv": csv_record}


def position_split(fen: str, val_fraction: float, test_fraction: float) -> str:
    return split_of(" ".join(fen.split()[:4]), val_fraction, test_fraction)


def parse_position_chunk(kind: str, records: list, filters) -> tuple[dict, collections.Counter, collections.Counter]:
    """Like prepare.parse_chunk, for position records."""
    rows = {split: ([], [], []) for split in SPLITS}
    kept: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    read = READERS[kind]
    for record in records:
        try:
            fen, cp, mate = read(record)
            board = chess.Board(fen if len(fen.split()) > 4 else fen + " 0 1")  # eval-db FENs lack the clocks
            if not board.is_valid():
                raise BadRecord("invalid_position")
        except BadRecord as bad:
            if bad.reason != "header":
                skipped[bad.reason] += 1
            continue
        except ValueError:
            skipped["bad_fen"] += 1
            continue
        split = position_split(fen, filters.val_fraction, filters.test_fraction)
        kept[split] += 1
        for column, value in zip(rows[split], (board_state(board), cp, mate)):
            column.append(value)
    arrays = {
        split: {"positions": pack_states(s), "cp": np.array(c, dtype=np.int32), "mate": np.array(m, dtype=np.int16)}
        for split, (s, c, m) in rows.items()
    }
    return arrays, kept, skipped
