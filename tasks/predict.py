"""Score chess positions with a trained evaluator.

    python -m tasks.predict --ckpt runs/x/checkpoints/last.ckpt "8/8/8/4k3/8/8/3QK3/8 w - - 0 1"
    python -m tasks.predict --ckpt ... --fens positions.txt   # one FEN per line
    python -m tasks.predict --ckpt ... --pgn games.pgn        # every position of each game's mainline

Prints `FEN<TAB>prediction`, the prediction in pawns from White's view, and for a model trained on
win probability (`--data.target win_prob`) a third column: White's win probability in [0, 1].
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

if not __package__:  # run as a path: this folder would come first on the import path, its chess.py before python-chess
    sys.stderr.write("error: run it as a module, from the repository's root: python -m tasks.predict ...\n")
    sys.exit(2)

import chess
import chess.pgn
import numpy as np
import torch
import tyro

from chessdata.encoding import pack_board
from chessdata.pgn import standard_chess
from config import ConfigError
from kibitz.tools import fail, load_checkpoint
from losses import to_pawns
from tasks.chess import CHESS


@dataclass
class PredictArgs:
    ckpt: Path
    """A chess checkpoint."""
    positions: Annotated[list[str], tyro.conf.Positional] = field(default_factory=list)
    """FEN strings."""
    fens: Path | None = None
    """A file with one FEN per line."""
    pgn: Path | None = None
    """A PGN file: every position of every game's mainline is scored."""
    batch_size: int = 4096
    """Positions per forward pass."""


def read_positions(args: PredictArgs) -> list[chess.Board]:
    """The positions to score: the FEN arguments, then the FEN file's, then every position of the PGN's games."""
    fens = list(args.positions)
    if args.fens:
        try:
            fens += [line.strip() for line in args.fens.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ConfigError(f"{args.fens}: expected a text file of FENs, one a line (not UTF-8 text)") from None
    boards = [
        board_of(fen, f"{args.fens} line {i - len(args.positions) + 1}" if i >= len(args.positions) else "argument")
        for i, fen in enumerate(fens)
    ]
    if args.pgn:
        boards += pgn_positions(args.pgn)
    if not boards:
        raise ConfigError("positions: expected FEN arguments, --fens FILE or --pgn FILE")
    return boards


def board_of(fen: str, where: str) -> chess.Board:
    try:
        board = chess.Board(fen)
    except ValueError as exc:
        raise ConfigError(f"invalid FEN {fen!r} ({where}): {exc}") from None
    if board.has_chess960_castling_rights() or not board.is_valid():  # what prepare refuses too
        raise ConfigError(f"FEN {fen!r} ({where}): not a legal standard-chess position ({board.status()!r})")
    return board


def pgn_positions(path: Path) -> list[chess.Board]:
    """Every position of each game's mainline; games of a variant are skipped, with a note."""
    boards, skipped, number = [], 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        while (game := chess.pgn.read_game(f)) is not None:
            number += 1
            board = game.board()
            if not standard_chess(dict(game.headers)) or board.chess960 or not board.is_valid():
                skipped += 1  # a variant, Chess960 or an impossible start: the model knows none of them
                continue
            if game.errors or any(not move for move in game.mainline_moves()):  # binary bytes read as "moves"
                reason = game.errors[0] if game.errors else "a null move (--)"
                raise ConfigError(f"{path}: not a PGN of legal games (game {number}: {reason})")
            for move in game.mainline_moves():
                board.push(move)
                boards.append(board.copy(stack=False))
    if not number or not boards and not skipped:
        raise ConfigError(f"{path}: not a PGN of legal games (no game with a move in it)")
    if skipped:
        print(f"note: {path}: skipped {skipped} games of a variant or from an invalid position", file=sys.stderr)
    return boards


@torch.no_grad()
def predict(model: torch.nn.Module, boards: list[chess.Board], batch_size: int) -> np.ndarray:
    packed = torch.from_numpy(np.stack([pack_board(b) for b in boards]))
    return torch.cat([model(packed[i : i + batch_size]) for i in range(0, len(packed), batch_size)]).float().numpy()


def main(argv: list[str]) -> int:
    try:
        args = tyro.cli(PredictArgs, args=argv, prog="python -m tasks.predict")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: expected a positive count, got {args.batch_size}")
        for path in (args.fens, args.pgn):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file")
        cfg, model = load_checkpoint(args.ckpt, CHESS)
        boards = read_positions(args)
        outputs = torch.from_numpy(predict(model, boards, args.batch_size))
        pawns = to_pawns(outputs, cfg.data.target).numpy()
        win = torch.sigmoid(outputs).numpy() if cfg.data.target == "win_prob" else None
        for i, board in enumerate(boards):
            extra = f"\t{win[i]:.4f}" if win is not None else ""
            print(f"{board.fen(en_passant='fen')}\t{pawns[i]:.4f}{extra}")
    except ConfigError as exc:
        return fail(f"error: {exc}")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            return fail(exc.code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
