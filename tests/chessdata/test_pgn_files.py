"""Real files in every shape: each case is checked against python-chess reading the same file (the reference for
what a PGN means), with the counts by reason, and never a traceback."""

import json
import sys
from pathlib import Path

import chess
import chess.engine
import chess.pgn
import numpy as np
import pytest
import zstandard
from conftest import ROOT, child_env, run_python

from chessdata import dedup, evals, folder, pgn, prepare
from chessdata.encoding import pack_board

NO_SPLIT = prepare.Filters(val_fraction=0, test_fraction=0, dedup=False)
SAMPLE_ALL = list(pgn.iter_games(folder.SAMPLE_PGN))
SAMPLE_GAMES = SAMPLE_ALL[:40]


def reference(path: Path, encoding: str = "utf-8") -> list[tuple[bytes, int, int]]:
    """Every evaluated position python-chess reads from the file, in order, up to a game's first null move."""
    rows = []
    with open(path, encoding=encoding) as handle:  # text mode: universal newlines, as a user would open it
        while (game := chess.pgn.read_game(handle)) is not None:
            rows += reference_game(game)
    return rows


def reference_game(game: chess.pgn.Game) -> list[tuple[bytes, int, int]]:
    rows = []
    for node in game.mainline():
        if not node.move:
            break
        score = node.eval()
        if score is not None:
            white = score.white()
            if white.is_mate():
                mate = white.mate() or (evals.CHECKMATE if white.score(mate_score=10**6) > 0 else -evals.CHECKMATE)
                cp = 0
            else:
                cp, mate = white.score(), 0
            rows.append((pack_board(node.board()).tobytes(), cp, mate))
    return rows


def prepared_rows(source: Path, out: Path) -> tuple[list[tuple[bytes, int, int]], dict]:
    meta = prepare.prepare([source], out, NO_SPLIT, workers=1)
    split = folder.load_split(out, "train")
    rows = [(r.tobytes(), int(c), int(m)) for r, c, m in zip(split["positions"], split["cp"], split["mate"])]
    return rows, meta


def game_text(movetext: str, tags: str = "", result: str = "*") -> str:
    return f'[Event "t"]\n[Result "{result}"]\n{tags}\n{movetext} {result}\n\n'


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_windows_and_old_mac_line_endings_read_like_lf(tmp_path, newline):
    lf = tmp_path / "lf.pgn"
    lf.write_text("".join(SAMPLE_GAMES))
    other = tmp_path / "other.pgn"
    other.write_bytes("".join(SAMPLE_GAMES).replace("\n", newline).encode())
    rows_lf, meta_lf = prepared_rows(lf, tmp_path / "a")
    rows, meta = prepared_rows(other, tmp_path / "b")
    assert meta["games_read"] == meta_lf["games_read"] == len(SAMPLE_GAMES)
    assert rows == rows_lf == reference(other)


def test_blank_lines_holding_spaces_and_a_bom(tmp_path):
    text = "\ufeff" + "".join(g.replace("\n\n", "\n \t\n") for g in SAMPLE_GAMES[:10])
    source = tmp_path / "g.pgn"
    source.write_text(text)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["games_read"] == 10 and meta["skipped"] == {}
    assert rows == reference(source)


def eval_game(scores: list[tuple[chess.engine.PovScore, int | None]], fen: str | None = None) -> str:
    """A game whose evals python-chess itself writes (`GameNode.set_eval(score, depth)`)."""
    game = chess.pgn.Game()
    if fen:
        game.setup(chess.Board(fen))
    node, board = game, game.board()
    for score, depth in scores:
        move = next(m for m in sorted(board.legal_moves, key=str))
        node = node.add_variation(move)
        board.push(move)
        node.set_eval(score, depth)
    return str(game) + "\n\n"


def test_every_eval_notation_python_chess_reads(tmp_path):
    white, black = chess.WHITE, chess.BLACK
    written = eval_game(
        [
            (chess.engine.PovScore(chess.engine.Cp(24), white), 20),
            (chess.engine.PovScore(chess.engine.Mate(-4), white), 22),
            (chess.engine.PovScore(chess.engine.Cp(-7), black), None),
        ]
    )
    assert "[%eval 0.24,20]" in written and "[%eval #-4,22]" in written
    by_hand = game_text("1. e4 { [%eval +1.5] } 1... e5 { [%eval .5] } 2. Nf3 { [%eval 3.] } 2... Nc6 { [%eval #+3] }")
    mated = game_text("1. f3 e5 2. g4 Qh4# { [%eval #0] }", result="0-1")  # White to move, mated
    source = tmp_path / "g.pgn"
    source.write_text(written + by_hand + mated)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["skipped"] == {} and rows == reference(source)
    assert [(cp, mate) for _, cp, mate in rows] == [
        (24, 0),
        (0, -4),
        (7, 0),
        (150, 0),
        (50, 0),
        (300, 0),
        (0, 3),
        (0, -evals.CHECKMATE),
    ]


@pytest.mark.parametrize(
    "value", ["inf", "nan", "99999999.99", "#40000", "#-99999999999", "0.245", "x.y", "1e3", "0.17 "]
)
def test_an_eval_that_cannot_be_stored_skips_its_game_as_bad_eval(tmp_path, value):
    source = tmp_path / "g.pgn"
    good = game_text("1. e4 { [%eval 0.2] }")
    source.write_text(good + game_text(f"1. d4 {{ [%eval 0.1] }} 1... d5 {{ [%eval {value}] }}") + good)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["skipped"] == {"bad_eval": 1} and meta["games_read"] == 3
    assert [(cp, mate) for _, cp, mate in rows] == [(20, 0), (20, 0)]


START = "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq -"
MATED = "rnb1kbnr/pppp1ppp/8/4p3/6Pq/5P2/PPPPP2P/RNBQKBNR w KQkq - 1 3"  # White is checkmated


def test_out_of_range_and_odd_evals_in_csv(tmp_path):
    source = tmp_path / "p.csv"
    lines = [
        "fen,eval",
        f"{START} 0 1,0.125",
        f"{START} 0 1,inf",
        f"{START} 0 1,-nan",
        f"{START} 0 1,1e300",
        f"{START} 0 1,#40000",
        f"{START} 0 1,",
        f"{MATED},#0",
        f"{MATED},#-0",
    ]
    source.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    meta = prepare.prepare([source], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_eval": 5} and meta["records_read"] == 9
    split = folder.load_split(tmp_path / "out", "train")
    assert split["cp"].tolist() == [12, 0, 0] and split["mate"].tolist() == [0, -evals.CHECKMATE, -evals.CHECKMATE]


def test_out_of_range_evals_and_a_bom_in_the_eval_database(tmp_path):
    def record(pv: dict, fen: str = START) -> str:
        return json.dumps({"fen": fen, "evals": [{"knodes": 1, "depth": 30, "pvs": [pv]}]})

    lines = [
        record({"cp": 31}),
        record({"cp": 10**12}),
        record({"mate": 40000}),
        record({"mate": -(2**70)}),
        record({"cp": 3.5}),
        record({"cp": "12"}),
        record({"mate": 0}, fen=" ".join(MATED.split()[:4])),
    ]
    source = tmp_path / "lichess_db_eval.jsonl.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress(("\ufeff" + "\n".join(lines) + "\n").encode()))
    meta = prepare.prepare([source], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_eval": 5} and meta["records_read"] == 7
    split = folder.load_split(tmp_path / "out", "train")
    assert split["cp"].tolist() == [31, 0] and split["mate"].tolist() == [0, -evals.CHECKMATE]


def test_pgn_and_eval_database_positions_are_one_position(tmp_path):
    """The game's rows carry the en-passant square after every double push; the eval database's FENs only where
    a capture is legal. Dedup and the splits must see one position, so no test position is ever trained on."""
    openings = ["e4 e5 Nf3 Nc6 Bb5 a6", "d4 d5 c4 e6 Nc3 Nf6", "e4 c5 Nf3 d6 d4 cxd4", "c4 e5 Nc3 Nf6 g3 d5"]
    games, records, fens = [], [], set()
    for i, opening in enumerate(openings):
        board, moves = chess.Board(), []
        for ply, san in enumerate(opening.split()):
            moves.append(("" if ply % 2 else f"{ply // 2 + 1}. ") + f"{san} {{ [%eval 0.{i}{ply}] }}")
            board.push_san(san)
            fens.add(board.epd())
            records.append(json.dumps({"fen": board.epd(), "evals": [{"depth": 40, "pvs": [{"cp": 10 + ply}]}]}))
        games.append(game_text(" ".join(moves), tags=f'[Round "{i}"]\n'))
    (tmp_path / "g.pgn").write_text("".join(games))
    (tmp_path / "e.jsonl").write_text("\n".join(records) + "\n")
    filters = prepare.Filters(val_fraction=0.3, test_fraction=0.3)
    meta = prepare.prepare([tmp_path / "g.pgn", tmp_path / "e.jsonl"], tmp_path / "out", filters, workers=1)
    keys = {
        split: [bytes(k) for k in dedup.key_bytes(folder.load_split(tmp_path / "out", split)["positions"])]
        for split in folder.SPLITS
    }
    every = [k for split in folder.SPLITS for k in keys[split]]
    assert len(every) == len(set(every)) == len(fens) == sum(c["positions"] for c in meta["splits"].values())


def test_comments_spanning_blank_lines_and_semicolon_and_escape_comments(tmp_path):
    spanning = game_text(
        '1. e4 { a note\n\n[%eval 0.3] still the note\n\n[Event "not a tag"] } 1... e5 { [%eval 0.2] }'
    )
    semicolons = (
        "% an escape line before the game\n"
        '[Event "s"]\n; a comment line among the tags\n[Result "*"]\n\n'
        "1. d4 { [%eval 0.1] } ; rest of the line { is no comment\n"
        "1... d5 { [%eval 0.15] }\n% an escape line in the moves\n2. c4 { [%eval 0.25] } *\n\n"
    )
    source = tmp_path / "g.pgn"
    source.write_text(spanning + semicolons)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["games_read"] == 2 and meta["skipped"] == {}
    assert rows == reference(source) and [cp for _, cp, _ in rows] == [30, 20, 10, 15, 25]


def test_games_joined_by_a_single_newline_are_two_games(tmp_path):
    first = game_text("1. e4 { [%eval 0.2] } 1... e5 { [%eval 0.3] }").rstrip("\n") + "\n"
    second = game_text("1. d4 { [%eval 0.1] }")
    (tmp_path / "a.pgn").write_text(first)
    (tmp_path / "b.pgn").write_text(second)
    joined = tmp_path / "joined.pgn"
    joined.write_text(first + second)  # what `cat a.pgn b.pgn` makes
    rows, meta = prepared_rows(joined, tmp_path / "out")
    assert meta["games_read"] == 2 and meta["skipped"] == {}
    assert rows == reference(tmp_path / "a.pgn") + reference(tmp_path / "b.pgn")


def test_games_from_a_set_up_position_are_replayed_from_it(tmp_path):
    fen = "r3k2r/pppq1ppp/2n1bn2/3pp3/3PP3/2N1BN2/PPPQ1PPP/R3K2R w KQkq - 4 8"
    scores = [(chess.engine.PovScore(chess.engine.Cp(10 * i), chess.WHITE), None) for i in range(6)]
    from_position = eval_game(scores, fen=fen)
    assert '[SetUp "1"]' in from_position and f'[FEN "{fen}"]' in from_position
    lichess = from_position.replace('[SetUp "1"]', '[Variant "From Position"]\n[SetUp "1"]')
    chess960 = eval_game(scores).replace('[Event "?"]', '[Event "?"]\n[Variant "Chess960"]')
    atomic = eval_game(scores).replace('[Event "?"]', '[Event "?"]\n[Variant "Atomic"]')
    bad_fen = from_position.replace(fen, "not a fen")
    source = tmp_path / "g.pgn"
    source.write_text(from_position + lichess + chess960 + atomic + bad_fen)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["skipped"] == {"variant": 2, "bad_fen": 1}
    reference_rows = reference_game(chess.pgn.read_game(__import__("io").StringIO(from_position)))
    assert len(reference_rows) == 6 and rows == reference_rows * 2


def test_an_illegal_or_null_move_keeps_the_positions_before_it(tmp_path):
    illegal = game_text("1. e4 { [%eval 0.2] } 1... e5 { [%eval 0.3] } 2. Ke3 { [%eval 0.1] } 2... Nc6 { [%eval 0] }")
    null = game_text("1. d4 { [%eval 0.1] } 1... -- { [%eval 0.9] } 2. c4 { [%eval 0.4] }")
    hopeless = game_text("1. e5 { [%eval 0.1] } 1... e5 { [%eval 0.2] }")
    source = tmp_path / "g.pgn"
    source.write_text(illegal + null + hopeless)
    rows, meta = prepared_rows(source, tmp_path / "out")
    assert meta["truncated"] == {"illegal_move": 1, "null_move": 1} and meta["skipped"] == {"illegal_move": 1}
    assert rows == reference(source) and [cp for _, cp, _ in rows] == [20, 30, 10]


def test_every_case_at_once_through_the_command_line_ends_without_a_traceback(tmp_path):
    text = "\ufeff" + "".join(SAMPLE_GAMES[:5]).replace("\n", "\r\n") + game_text("1. e4 { [%eval inf] }")
    text += game_text("1. e4 { [%eval 0.1] } 1... e5 { unclosed") + "\x00\xff garbage line\n"  # a comment to the end
    (tmp_path / "g.pgn").write_text(text, errors="surrogateescape")
    (tmp_path / "p.csv").write_text(f"{START} 0 1,1e400\n{START} 0 1,0.3\nno comma here\n")
    result = run_python(
        [
            sys.executable,
            "-m",
            "chessdata",
            "prepare",
            str(tmp_path / "g.pgn"),
            str(tmp_path / "p.csv"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "positions from 5 games and 1 records" in result.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"] == {"bad_eval": 2, "broken_comment": 1, "bad_row": 1}


def test_a_corrupt_zst_names_the_damaged_stretch(tmp_path):
    rng = np.random.default_rng(0)
    # text that compresses poorly, so the damage sits deep in a long archive
    games = [game_text(f"1. e4 {{ [%eval 0.1] {rng.bytes(600).hex()} }}") for _ in range(2000)]
    payload = bytearray(zstandard.ZstdCompressor().compress("".join(games).encode()))
    damaged_at = len(payload) * 2 // 3
    payload[damaged_at : damaged_at + 64] = bytes(64)
    source = tmp_path / "g.pgn.zst"
    source.write_bytes(bytes(payload))
    with pytest.raises(pgn.CorruptArchive) as info:
        list(pgn.iter_games(source))
    low, high = map(int, __import__("re").search(r"between compressed bytes (\d+) and (\d+)", str(info.value)).groups())
    assert low <= damaged_at < high and high - low <= (128 + 32) * 1024  # a zstd block and one feed, not 1 MiB


def test_memory_stays_bounded_whatever_the_line_endings(tmp_path):
    """A CRLF file (and one whose games are joined by single newlines) several times the sample's size peaks
    within a small constant of the LF file, while cutting its games."""
    import re
    import tracemalloc

    games = [re.sub(r"\[%eval [^\]]*\] ", "", g) if i % 10 else g for i, g in enumerate(SAMPLE_ALL)]
    text = "".join(games) * 4  # ~33 MB of PGN text
    variants = {"lf": text, "crlf": text.replace("\n", "\r\n"), "joined": text.replace("\n\n[", "\n[")}
    peaks = {}
    for name, content in variants.items():
        source = tmp_path / f"{name}.pgn.zst"
        source.write_bytes(zstandard.ZstdCompressor(level=1).compress(content.encode()))
        del content
        tracemalloc.start()
        count = sum(1 for _ in pgn.iter_games(source))
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert count == len(games) * 4, name
    assert peaks["crlf"] < peaks["lf"] + 16 and peaks["joined"] < peaks["lf"] + 16, peaks


def test_the_fast_cut_and_the_line_by_line_cut_agree(tmp_path):
    """Lichess-shaped games are cut by str.split; anything else by GameCutter. Both must cut alike, on the sample
    and on a corpus with every odd shape mixed in."""
    odd = [
        game_text("1. e4 { a note\n\n[%eval 0.3] } 1... e5 { [%eval 0.2] }"),
        "; a comment line\n" + game_text("1. d4 { [%eval 0.1] } ; rest\n1... d5"),
        game_text("1. c4 { [%eval 0.1] }").rstrip("\n") + "\n",
        '[Event "only tags"]\n\n',
    ]
    for games in (SAMPLE_ALL[:300], [g for pair in zip(SAMPLE_ALL[:40], odd * 10) for g in pair]):
        source = tmp_path / "g.pgn"
        source.write_text("".join(games))
        cutter = pgn.GameCutter()
        by_lines = cutter.feed("".join(games) + "\n") + cutter.finish()
        assert list(pgn.iter_games(source)) == by_lines


def test_out_of_range_evals_in_sqlite(tmp_path):
    import sqlite3

    db = tmp_path / "evals.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE evaluations (fen TEXT, eval FLOAT)")
        rows = [(START + " 0 1", 0.5), (START + " 0 1", float("inf")), (START + " 0 1", -1e300), (MATED, -152.65)]
        con.executemany("INSERT INTO evaluations VALUES (?, ?)", rows)
    meta = prepare.prepare([db], tmp_path / "out", NO_SPLIT, workers=1)
    assert meta["skipped"] == {"bad_eval": 2} and meta["records_read"] == 4
    assert folder.load_split(tmp_path / "out", "train")["cp"].tolist() == [50, -15265]
