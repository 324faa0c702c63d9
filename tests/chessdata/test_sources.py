"""The lichess eval database (.jsonl.zst), SQLite (fen, eval) tables and CSV, through prepare."""

import json
import sqlite3
from pathlib import Path

import chess
import numpy as np
import pytest
import zstandard

from chessdata import folder as data
from chessdata import prepare
from chessdata.encoding import pack_fen

START = "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq -"
E4 = "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq -"
MATED = "6k1/5ppp/8/8/8/8/5PPP/3R2K1 w - -"  # Rd8 mates
NO_SPLIT = prepare.Filters(val_fraction=0, test_fraction=0)


def rows_by_fen(directory: Path) -> dict[bytes, tuple[int, int]]:
    split = data.load_split(directory, "train")
    return {
        row.tobytes(): (int(cp), int(mate)) for row, cp, mate in zip(split["positions"], split["cp"], split["mate"])
    }


def test_eval_database_takes_the_deepest_first_line(tmp_path):
    lines = [
        {
            "fen": START,
            "evals": [
                {"knodes": 100, "depth": 20, "pvs": [{"cp": 30, "line": "e2e4"}]},
                {"knodes": 900, "depth": 36, "pvs": [{"cp": 18, "line": "e2e4"}, {"cp": 10}]},
            ],
        },
        {"fen": MATED, "evals": [{"knodes": 5, "depth": 99, "pvs": [{"mate": 1, "line": "d1d8"}]}]},
        {"fen": E4, "evals": []},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    source = tmp_path / "lichess_db_eval.jsonl.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    meta = prepare.prepare([source], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_json": 2}
    rows = rows_by_fen(tmp_path / "out")
    assert rows[pack_fen(START + " 0 1").tobytes()] == (18, 0)
    assert rows[pack_fen(MATED + " 0 1").tobytes()] == (0, 1)


def test_sqlite_table_in_the_37m_layout(tmp_path):
    db = tmp_path / "evals.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE evaluations (id INTEGER PRIMARY KEY, fen TEXT, binary BLOB, eval FLOAT)")
        con.executemany(
            "INSERT INTO evaluations (fen, binary, eval) VALUES (?, ?, ?)",
            [
                (START + " 0 1", b"", 0.2),
                (MATED + " 0 1", b"", 152.65),
                (E4 + " 0 1", b"", None),
                ("not a fen", b"", 1.0),
                ("8/8/8/8/8/8/8/8 w - - 0 1", b"", 0.0),
            ],
        )
    meta = prepare.prepare([db], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_row": 1, "bad_fen": 1, "invalid_position": 1}
    rows = rows_by_fen(tmp_path / "out")
    assert rows[pack_fen(START + " 0 1").tobytes()] == (20, 0)
    assert rows[pack_fen(MATED + " 0 1").tobytes()] == (15265, 0)  # kept raw; the clamp maps it to +15
    assert data.eval_target(np.array([15265]), np.array([0]), 15.0)[0] == 15.0


def test_csv_with_header_and_mates(tmp_path):
    source = tmp_path / "positions.csv"
    source.write_text(f"fen,eval\n{START} 0 1,0.25\n{MATED} 0 1,#1\n{E4} 0 1,not-a-number\n")
    meta = prepare.prepare([source], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_eval": 1}
    rows = rows_by_fen(tmp_path / "out")
    assert rows[pack_fen(START + " 0 1").tobytes()] == (25, 0)
    assert rows[pack_fen(MATED + " 0 1").tobytes()] == (0, 1)


def test_every_source_in_one_run_and_position_splits_are_stable(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("".join(f"{fen} 0 1,0.{i}\n" for i, fen in enumerate([START, E4, MATED])))
    games = tmp_path / "g.pgn"
    games.write_text('[Event "x"]\n[Result "1-0"]\n\n1. e4 { [%eval 0.2] } 1... e5 { [%eval 0.3] } 1-0\n\n')
    meta = prepare.prepare([games, csv], tmp_path / "out", workers=2, games_per_chunk=1)
    # 5 rows, but the position after 1. e4 is also the CSV's E4 (the game's row has the e3 square, the FEN not): one
    assert sum(c["positions"] for c in meta["splits"].values()) == 4
    from chessdata.sources import position_split

    board = chess.Board(START + " 0 1")
    assert position_split(START + " 0 1", board, 0.3, 0.3) == position_split(START + " 12 40", board, 0.3, 0.3)


def test_unknown_source_type_is_one_line(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"x\.parquet: unknown source type"):
        prepare.prepare([bad], tmp_path / "out")
