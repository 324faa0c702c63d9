from pathlib import Path

import chess
import numpy as np
import pytest
import zstandard

from chessdata import cli, encoding, evals, folder, pgn, prepare

HEADERS = '[Event "Rated Blitz game"]\n[Site "https://lichess.org/abcdefgh"]\n[Result "{result}"]\n\n'


def game(movetext: str, result: str = "0-1") -> str:
    return HEADERS.format(result=result) + movetext + "\n\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.17", (17, 0)),
        ("-1.50", (-150, 0)),
        ("0.0", (0, 0)),
        ("152.65", (15265, 0)),
        ("#3", (0, 3)),
        ("#-2", (0, -2)),
    ],
)
def test_parse_eval(text, expected):
    assert evals.read_eval(text) == expected
    cp, mate = expected
    assert evals.read_eval(evals.format_eval(cp, mate)) == expected


def test_eval_labels_the_position_after_its_move():
    text = game(
        "1. e4 { [%eval 0.17] [%clk 0:03:00] } 1... e5 { [%eval 0.2] [%clk 0:03:00] } "
        "2. Qh5?! { [%eval -0.5] } 2... Nc6 { [%eval 0.1] } 3. Bc4 { [%eval 0.3] } "
        "3... Nf6?? { [%eval #1] } 4. Qxf7# 1-0",
        result="1-0",
    )
    headers, states, cps, mates, truncated = pgn.game_positions(text)
    assert truncated is None
    assert headers["Result"] == "1-0"
    assert cps == [17, 20, -50, 10, 30, 0] and mates == [0, 0, 0, 0, 0, 1]  # no eval after the mate
    board = chess.Board()
    board.push_san("e4")
    assert states[0] == encoding.board_state(board)


def test_old_format_without_black_move_numbers():
    _, states, cps, _, _ = pgn.game_positions(game("1. d4 { [%eval 0.1] } d5 { [%eval 0.2] } 2. c4 { [%eval 0.0] } *"))
    assert cps == [10, 20, 0] and len(states) == 3


@pytest.mark.parametrize(
    "movetext, reason",
    [
        ("1. e4 { [%eval 0.1] } 1... e5 { [%eval 0.1] }", "missing_result"),
        ("1. e4 { [%eval 0.1] 1... e5 0-1", "broken_comment"),
        ("1. e4 { [%eval x.y] } 0-1", "bad_eval"),
    ],
)
def test_malformed_games_raise_with_reason(movetext, reason):
    with pytest.raises(pgn.BadGame) as info:
        pgn.game_positions(game(movetext))
    assert info.value.reason == reason


def test_variants_are_refused():
    text = '[Event "x"]\n[Variant "Chess960"]\n\n1. e4 { [%eval 0.1] } 1-0\n\n'
    with pytest.raises(pgn.BadGame, match="variant"):
        pgn.game_positions(text)


def test_prepare_skips_and_counts(tmp_path: Path):
    good = game("1. e4 { [%eval 0.17] } 1... e5 { [%eval #-3] } 0-1")
    no_eval = game("1. e4 { [%clk 0:03:00] } 1... e5 0-1")
    illegal = game("1. e4 { [%eval 0.1] } 1... Ke3 { [%eval 0.1] } 0-1")
    source = tmp_path / "games.pgn.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress((good + no_eval + illegal + good).encode()))
    meta = cli.prepare([source], tmp_path / "out", val_fraction=0, test_fraction=0, dedup=False)
    assert meta["games_read"] == 4
    assert meta["skipped"] == {"no_eval": 1}
    assert meta["truncated"] == {"illegal_move": 1}  # its first position, before Ke3, is kept
    assert meta["splits"]["train"]["positions"] == 5
    arrays = folder.load_split(tmp_path / "out", "train")
    assert arrays["cp"].tolist() == [17, 0, 10, 17, 0] and arrays["mate"].tolist() == [0, -3, 0, 0, -3]


def test_split_is_by_game_and_stable(prepared: Path):
    meta = (prepared / "meta.json").read_text()
    assert '"test"' in meta
    rows = {split: {r.tobytes() for r in folder.load_split(prepared, split)["positions"]} for split in folder.SPLITS}
    assert all(len(rows[s]) > 0 for s in folder.SPLITS)
    games = list(pgn.iter_games(folder.SAMPLE_PGN))[:50]
    assert [prepare.split_of(g, 0.05, 0.05) for g in games] == [prepare.split_of(g, 0.05, 0.05) for g in games]


def test_dump_prints_fen_and_lichess_eval(prepared: Path, capsys):
    cli.dump(prepared, split="test", limit=5)
    lines = capsys.readouterr().out.splitlines()
    arrays = folder.load_split(prepared, "test")
    assert len(lines) == 5
    for i, line in enumerate(lines):
        fen, value = line.split("\t")
        assert np.array_equal(encoding.pack_fen(fen), arrays["positions"][i])
        black_to_move = fen.split()[1] == "b"
        assert evals.read_eval(value, black_to_move) == (int(arrays["cp"][i]), int(arrays["mate"][i]))


def test_sample_matches_lichess_format():
    first = next(pgn.iter_games(folder.SAMPLE_PGN))
    headers, movetext = pgn.parse_headers(first)
    for tag in (
        "Event",
        "Site",
        "Date",
        "White",
        "Black",
        "Result",
        "UTCDate",
        "UTCTime",
        "WhiteElo",
        "BlackElo",
        "TimeControl",
        "Termination",
    ):
        assert tag in headers
    assert movetext.startswith("1. ") and "[%eval " in movetext and "[%clk " in movetext
    assert movetext.endswith(headers["Result"])


def test_corrupt_zst_names_file_and_offset(tmp_path: Path):
    payload = zstandard.ZstdCompressor().compress((game("1. e4 { [%eval 0.1] } 0-1") * 2000).encode())
    broken = tmp_path / "broken.pgn.zst"
    broken.write_bytes(payload[: len(payload) // 2] + b"\x00garbage" * 64)
    with pytest.raises(SystemExit, match=r"broken\.pgn\.zst: (corrupt|truncated) zstd .* compressed bytes? \d+"):
        cli.prepare([broken], tmp_path / "out")


def test_truncated_zst_names_file_and_offset(tmp_path: Path):
    payload = zstandard.ZstdCompressor().compress((game("1. e4 { [%eval 0.1] } 0-1") * 2000).encode())
    cut = tmp_path / "cut.pgn.zst"
    cut.write_bytes(payload[: len(payload) - 10])
    with pytest.raises(SystemExit, match=r"cut\.pgn\.zst: truncated zstd archive.*byte \d+"):
        cli.prepare([cut], tmp_path / "out")


def test_multi_frame_zst_and_plain_pgn_read_alike(tmp_path: Path):
    games = [game(f"1. e4 {{ [%eval 0.{i}] }} 0-1") for i in range(1, 10)]
    plain = tmp_path / "g.pgn"
    plain.write_text("".join(games))
    frames = tmp_path / "g.pgn.zst"
    frames.write_bytes(b"".join(zstandard.ZstdCompressor().compress(g.encode()) for g in games))
    assert list(pgn.iter_games(plain)) == list(pgn.iter_games(frames))
    assert len(list(pgn.iter_games(plain))) == 9
