"""tasks/engine.py: the search finds mates and always answers a legal move; the UCI conversation, driven by
python-chess's own client, plays a whole game; `stop` is heard; a hostile `position` line is one line on stderr."""

import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import chess
import chess.engine
import chess.pgn
import pytest
from conftest import ROOT, child_env, python_process, run_python, run_script, tiny_args

import train
from tasks import engine


def best(fen: str, depth: int) -> chess.Move:
    return engine.Search(engine.material, engine.Limits(depth=depth), threading.Event(), report=lambda _: None).run(
        chess.Board(fen)
    )


@pytest.mark.parametrize(
    "fen,depth,expected",
    [
        ("6k1/5ppp/8/8/8/8/8/R5K1 w - - 0 1", 3, "a1a8"),  # a back-rank mate in one
        ("r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR w KQkq - 4 4", 3, "h5f7"),  # scholar's mate
        ("kbK5/pp6/1P6/8/8/8/8/R7 w - - 0 1", 4, "a1a6"),  # mate in two: Ra6 bxa6 b7#
        ("6rk/7p/8/8/8/8/8/K5QR b - - 0 1", 3, "g8g1"),  # Black to move takes the queen: scores from its side
    ],
)
def test_the_search_finds_mates_and_wins_material_from_the_side_to_move(fen, depth, expected):
    assert best(fen, depth).uci() == expected


def test_a_legal_move_in_every_position_of_a_sample():
    from tasks import arena

    special = [
        "8/P6k/8/8/8/8/8/K7 w - - 0 1",  # a promotion
        "r3k2r/8/8/8/8/8/8/R3K2R w KQkq - 0 1",  # castling both ways
        "8/8/8/3pP3/8/8/8/k6K w - d6 0 2",  # en passant
        "k7/8/1K6/8/8/8/8/7R b - - 0 1",  # one legal move
        "4k3/8/8/8/8/8/4q3/4K3 w - - 0 1",  # one legal move, out of check: take the queen
        "k7/8/1Q6/8/8/8/8/7K b - - 0 1",  # stalemate
        "7k/5Q2/6K1/8/8/8/8/8 b - - 0 1",  # stalemate
    ]
    rng, boards = random.Random(0), [chess.Board(fen) for fen in special]
    assert [boards[3].legal_moves.count(), boards[4].legal_moves.count()] == [1, 1]
    for _ in range(8):  # positions of random games
        board = chess.Board()
        for _ in range(rng.randrange(10, 80)):
            moves = list(board.legal_moves)
            if not moves:
                break
            board.push(rng.choice(moves))
        boards.append(board)
    for opening in arena.openings(4, 24):  # positions of the bundled sample's games, every fourth ply
        board = chess.Board()
        for ply, move in enumerate(opening):
            board.push(move)
            if ply % 4 == 3:
                boards.append(board.copy())
    for board in boards:
        search = engine.Search(engine.material, engine.Limits(depth=2), threading.Event(), report=lambda _: None)
        move = search.run(board.copy())
        if board.is_game_over():
            assert move is None
        else:
            assert move in board.legal_moves, board.fen()


def uci(*lines: str, wait: float = 0) -> subprocess.CompletedProcess:
    process = python_process(
        [sys.executable, "-m", "tasks.engine", "--material"],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate("".join(line + "\n" for line in lines), timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow  # starts the engine as its own process
def test_a_hostile_position_line_or_a_missing_checkpoint_is_one_line():
    missing = run_python(
        [sys.executable, "-m", "tasks.engine", "--ckpt", "no/such.ckpt"], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        missing.returncode == 2 and missing.stderr == "error: ckpt: no/such.ckpt is not a checkpoint file or folder\n"
    )
    lines = ["uci", "position fen not a fen", "position startpos moves e2e5", "position", "go depth x", "isready"]
    result = uci(*lines, "quit")
    assert result.returncode == 0 and "uciok" in result.stdout and "readyok" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: position: ") for line in errors[:3]), result.stderr
    assert "illegal move e2e5" in errors[1] and "Traceback" not in result.stderr
    assert errors[3] == "error: go: depth expects a whole number, got 'x'" and "bestmove" not in result.stdout


@pytest.mark.slow  # starts the engine as its own process
def test_a_whole_game_through_python_chess_s_uci_client_and_stop_is_heard():
    command = [sys.executable, "-m", "tasks.engine", "--material"]
    with chess.engine.SimpleEngine.popen_uci(command, cwd=ROOT, env=child_env(), timeout=120) as player:
        assert player.id["name"] == "kibitz material"
        board, rng = chess.Board(), random.Random(1)
        while not board.is_game_over() and board.fullmove_number < 60:  # against a random mover
            if board.turn == chess.WHITE:
                board.push(player.play(board, chess.engine.Limit(depth=2)).move)  # python-chess checks it is legal
            else:
                board.push(rng.choice(list(board.legal_moves)))
        assert board.is_checkmate() and board.outcome().winner == chess.WHITE, board.fen()

        started = time.monotonic()
        with player.analysis(chess.Board(), chess.engine.Limit()) as analysis:  # go infinite ...
            time.sleep(0.5)
            analysis.stop()  # ... then stop
            analysis.wait()
        assert time.monotonic() - started < 5


def test_the_arena_s_elo_is_the_score_s_and_its_interval_shrinks_with_games():
    from tasks import arena

    score, difference, interval = arena.elo([1.0, 1.0, 1.0, 0.0])  # 3 of 4: +191 Elo
    assert score == 0.75 and round(difference) == 191 and interval > 0
    assert arena.elo([1.0, 1.0, 1.0, 0.0] * 25)[2] < interval  # 100 games: a narrower interval
    assert arena.elo([0.5, 0.5])[1:] == (0.0, 0.0)


def test_a_lost_game_is_resigned_only_when_both_engines_agree_long_enough():
    from tasks import arena

    assert arena.resignation([1200, 1100] * 5, 1000, 5) == "1-0"
    assert arena.resignation([-1200, -100_000] * 5, 1000, 5) == "0-1"
    assert arena.resignation([1200, 900] * 5, 1000, 5) is None  # one engine does not see it lost
    assert arena.resignation([1200, 1100] * 4, 1000, 5) is None  # not for long enough
    assert arena.resignation([1200, None] * 5, 1000, 5) is None  # an engine that gave no score
    assert arena.resignation([1200, 1100] * 5, 1000, 0) is None  # resigning turned off


@pytest.fixture(scope="module")
def network(prepared, tmp_path_factory) -> str:
    """The command of an engine on a briefly trained chess network."""
    out = tmp_path_factory.mktemp("network")
    assert train.main(tiny_args(prepared, out, "--run-name", "net", "--train.max-steps", "4")) == 0
    return f"{sys.executable} -m tasks.engine --ckpt {out / 'net' / 'checkpoints' / 'last.ckpt'}"


def arena(tmp_path: Path, *args: str) -> list[chess.pgn.Game]:
    """The games of an arena run with these flags, each checked over by the rules or resigned."""
    command = [sys.executable, "-m", "tasks.arena", *args, "--depth", "1", "--pgn", str(tmp_path / "g.pgn")]
    result = run_script(command[1:], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Elo difference" in result.stdout
    games = []
    with open(tmp_path / "g.pgn") as f:
        while (game := chess.pgn.read_game(f)) is not None:
            games.append(game)
    for game in games:  # every move legal (python-chess would not have played it otherwise), and the game over
        board = game.end().board()
        over = board.is_game_over(claim_draw=True) or board.ply() >= 300
        assert over or game.headers.get("Termination") == "adjudication", game
        assert game.headers["Result"] in ("1-0", "0-1", "1/2-1/2")
    return games


@pytest.mark.slow  # trains a network, then starts four engines
def test_a_short_arena_of_a_trained_network_against_material_plays_each_opening_both_ways(network, tmp_path):
    games = arena(tmp_path, "--engine", network, "--games", "4", "--concurrency", "2")
    assert len(games) == 4
    openings = [list(game.mainline_moves())[:8] for game in games]
    assert openings[0] == openings[1] and openings[2] == openings[3] and openings[0] != openings[2]
    assert [game.headers["White"] for game in games] == ["kibitz", "kibitz material"] * 2  # colours alternate


STOCKFISH = shutil.which("stockfish") or next((p for p in ["/usr/games/stockfish"] if Path(p).exists()), None)


@pytest.mark.slow  # starts the engine and Stockfish
@pytest.mark.skipif(STOCKFISH is None, reason="Stockfish is not installed (apt-get install stockfish)")
def test_the_network_plays_whole_games_against_stockfish(network, tmp_path):
    opponent = ["--opponent", STOCKFISH, "--opponent-option", "Skill Level=0", "--opponent-movetime", "0.05"]
    games = arena(tmp_path, "--engine", network, *opponent, "--games", "2")
    assert len(games) == 2 and games[0].headers["White"] == "kibitz"
    assert games[1].headers["White"].startswith("Stockfish")


def test_a_mistake_in_the_arena_s_flags_is_named():
    from tasks import arena

    assert arena.mistake_in(arena.ArenaArgs()) is None
    assert arena.mistake_in(arena.ArenaArgs(games=0)) == "--games: expected at least 1, got 0"
    assert arena.mistake_in(arena.ArenaArgs(concurrency=0)) == "--concurrency: expected at least 1, got 0"
    assert arena.mistake_in(arena.ArenaArgs(opponent_option=["Skill"])) == (
        "--opponent-option: expected NAME=VALUE, got 'Skill'"
    )
    assert arena.mistake_in(arena.ArenaArgs(pgn=ROOT / "no-such-folder" / "g.pgn")) == (
        f"--pgn: expected a file in an existing folder, got {ROOT / 'no-such-folder' / 'g.pgn'}"
    )
    assert arena.mistake_in(arena.ArenaArgs(pgn=ROOT)).startswith("--pgn: expected a file")


@pytest.mark.slow  # starts the arena's process and engines
def test_an_engine_that_does_not_start_or_take_its_option_is_one_line_and_nothing_is_left_running():
    for flags in (["--engine", "no-such-engine"], ["--opponent-option", "NoSuchOption=1"]):
        command = [sys.executable, "-m", "tasks.arena", *flags, "--games", "2"]
        result = run_script(command[1:], timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: an engine failed: "), result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert "NoSuchOption" in result.stderr  # and the engine that did start was stopped: the arena exited
