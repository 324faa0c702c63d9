"""The fast SAN replay gives exactly python-chess's positions, and refuses what python-chess refuses."""

import random

import chess
import pytest
from conftest import random_games

from chessdata import folder as data
from chessdata import pgn
from chessdata.encoding import board_state
from chessdata.replay import FastBoard, IllegalMove


def replay_both(sans: list[str]) -> int:
    fast, reference = FastBoard(), chess.Board()
    for san in sans:
        reference.push_san(san)
        fast.push_san(san)
        assert fast.state() == board_state(reference), f"after {san} in {' '.join(sans)}"
        assert fast.in_check == reference.is_check()
    return len(sans)


def sans_of(board: chess.Board) -> list[str]:
    replay, sans = chess.Board(), []
    for move in board.move_stack:
        sans.append(replay.san(move))
        replay.push(move)
    return sans


def test_random_legal_games_match_python_chess():
    positions = 0
    kinds = {"promotion": 0, "castling": 0, "en_passant": 0, "mate": 0}
    for board in random_games(300, seed=7):
        replay = chess.Board()
        for move in board.move_stack:
            kinds["promotion"] += bool(move.promotion)
            kinds["castling"] += replay.is_castling(move)
            kinds["en_passant"] += replay.is_en_passant(move)
            replay.push(move)
        kinds["mate"] += board.is_checkmate()
        positions += replay_both(sans_of(board))
    assert positions > 30_000 and all(count > 10 for count in kinds.values()), kinds


def test_the_bundled_sample_matches_python_chess():
    games = 0
    for text in pgn.iter_games(data.SAMPLE_PGN):
        _, movetext = pgn.parse_headers(text)
        sans = [
            t.rstrip("!?")
            for t in pgn._TOKEN.findall(movetext)
            if not (t.startswith("{") or pgn._MOVE_NUMBER.match(t) or t in pgn.RESULTS)
        ]
        replay_both(sans)
        games += 1
    assert games >= 1500


@pytest.mark.parametrize(
    "fen, san",
    [
        ("4k3/8/8/8/8/8/4r3/R3K2R w KQ - 0 1", "O-O"),  # castling out of check
        ("4k3/8/8/8/8/8/6r1/R3K2R w KQ - 0 1", "O-O"),  # the king would land on an attacked square
        ("4k3/4r3/8/8/8/8/4N3/4K3 w - - 0 1", "Nf4"),  # a pinned knight
        ("4k3/8/8/8/8/8/8/4K3 w - - 0 1", "Ke8"),  # no such king move
        ("4k3/8/8/8/8/8/4P3/4K3 w - - 0 1", "e5"),  # a pawn cannot jump three squares
        ("4k3/P7/8/8/8/8/8/4K3 w - - 0 1", "a8"),  # a promotion needs its piece
        ("8/8/8/2k5/3Pp3/8/8/4K2q b - d3 0 1", "exd3"),  # en passant that exposes the king... is legal here
        ("8/8/8/8/k2Pp2Q/8/8/4K3 b - d3 0 1", "exd3"),  # ...and illegal here (both pawns leave the rank)
        ("rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1", "--"),  # a null move
        ("rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1", "Nxf3"),  # a needless capture sign
        ("4k3/8/8/8/8/2N3N1/8/4K3 w - - 0 1", "Ne4"),  # ambiguous without disambiguation
        ("4k3/8/8/8/8/2N3N1/8/4K3 w - - 0 1", "Nce4"),
    ],
)
def test_edge_cases_agree_with_python_chess(fen, san):
    reference = chess.Board(fen)
    fast = FastBoard.from_board(reference)
    try:
        move = reference.parse_san(san)
        expected = None if not move else move
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(IllegalMove):
            fast.push_san(san)
    else:
        reference.push(expected)
        fast.push_san(san)
        assert fast.state() == board_state(reference)


def test_random_san_garbage_never_differs_from_python_chess():
    rng = random.Random(11)
    alphabet = "NBRQKabcdefgh12345678x=+#O-"
    for board in random_games(40, seed=12, max_plies=60):
        reference = chess.Board()
        for move in board.move_stack:
            junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))
            try:
                expected = reference.parse_san(junk)
            except ValueError:
                expected = None
            if expected:
                probe = reference.copy()
                probe.push(expected)
                copy = FastBoard.from_board(reference)
                copy.push_san(junk)
                assert copy.state() == board_state(probe), junk
            else:
                with pytest.raises(IllegalMove):
                    FastBoard.from_board(reference).push_san(junk)
            reference.push(move)
