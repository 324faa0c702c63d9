"""A chess engine on a trained evaluator, speaking UCI on stdin and stdout.

    python -m tasks.engine --ckpt runs/x/checkpoints/last.ckpt    # the network at the leaves
    python -m tasks.engine --material                              # material count at the leaves: the baseline

The search is iterative-deepening alpha-beta in negamax form, with a quiescence search over captures at the leaves
so a position is never judged in the middle of an exchange. Moves are ordered by the previous iteration's best move,
then captures (the most valuable victim first), then the rest. Mate, stalemate, repetition and the fifty-move rule
are scored as the rules say. The evaluator scores from White's view in pawns; the search works from the side to
move, so a score is negated for Black. The network scores all of a node's children in one batch: a quiescence node
asks for its children's static scores before it visits them, and the cache answers the visits.
"""

import sys
import threading
import time
from dataclasses import dataclass

if not __package__:  # run as a path: this folder would come first on the import path, its chess.py before python-chess
    sys.stderr.write("error: run it as a module, from the repository's root: python -m tasks.engine ...\n")
    sys.exit(2)

import chess

MATE = 100_000  # in centipawns: a mate in n plies scores MATE - n
PIECE_VALUES = {chess.PAWN: 100, chess.KNIGHT: 300, chess.BISHOP: 300, chess.ROOK: 500, chess.QUEEN: 900}


def material(boards: list[chess.Board]) -> list[float]:
    """Each board's material balance in pawns from White's view: the baseline evaluator."""
    scores = []
    for board in boards:
        white = sum(len(board.pieces(kind, chess.WHITE)) * value for kind, value in PIECE_VALUES.items())
        black = sum(len(board.pieces(kind, chess.BLACK)) * value for kind, value in PIECE_VALUES.items())
        scores.append((white - black) / 100)
    return scores


def position_key(board: chess.Board) -> tuple:
    """What makes two positions the same for the search: the pieces, the side to move, castling and en passant (a
    tuple of python-chess's bitboards; its Zobrist hash is ten times slower in Python)."""
    return (
        board.pawns,
        board.knights,
        board.bishops,
        board.rooks,
        board.queens,
        board.kings,
        board.occupied_co[chess.WHITE],
        board.turn,
        board.castling_rights,
        board.ep_square,
    )


class Stopped(Exception):
    """The search was told to stop (`stop`, its time or its node budget)."""


@dataclass
class Limits:
    depth: int = 64
    nodes: int | None = None
    seconds: float | None = None


class Search:
    """One search of one position. `evaluate(boards)` gives each board's score in pawns from White's view."""

    def __init__(self, evaluate, limits: Limits, stop: threading.Event, report=print):
        self.evaluate, self.limits, self.stop, self.report = evaluate, limits, stop, report
        self.nodes, self.started, self.static, self.best = 0, time.monotonic(), {}, {}

    def run(self, board: chess.Board) -> chess.Move | None:
        """The best move found by deepening one ply at a time until a limit; None when there is no legal move."""
        moves = list(board.legal_moves)
        if not moves:
            return None
        chosen = moves[0]
        for depth in range(1, self.limits.depth + 1):
            try:
                score, line = self.root(board, depth)
            except Stopped:
                break
            chosen = line[0]
            self.say(depth, score, line)
            if len(moves) == 1 or abs(score) >= MATE - 100:  # forced, or a mate found: deeper changes nothing
                break
        return chosen

    def say(self, depth: int, score: int, line: list[chess.Move]) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        if abs(score) >= MATE - 100:
            plies = MATE - abs(score)
            shown = f"mate {(plies + 1) // 2 if score > 0 else -((plies + 1) // 2)}"
        else:
            shown = f"cp {score}"
        pv = " ".join(move.uci() for move in line)
        self.report(f"info depth {depth} score {shown} nodes {self.nodes} nps {int(self.nodes / elapsed)} pv {pv}")

    def root(self, board: chess.Board, depth: int) -> tuple[int, list[chess.Move]]:
        alpha, line = -MATE - 1, []
        for move in self.ordered(board, list(board.legal_moves)):
            board.push(move)
            try:
                score, rest = self.negamax(board, depth - 1, -MATE - 1, -alpha, 1)
            finally:
                board.pop()
            if -score > alpha:
                alpha, line = -score, [move, *rest]
        self.best[position_key(board)] = line[0]
        return alpha, line

    def negamax(self, board: chess.Board, depth: int, alpha: int, beta: int, ply: int) -> tuple[int, list]:
        """The score of `board` for the side to move, within (alpha, beta), and the line that gives it."""
        self.count()
        if (ended := self.ended(board, ply)) is not None:
            return ended, []
        if depth <= 0:
            return self.quiescence(board, alpha, beta), []
        key, line = position_key(board), []
        best_move, moves = None, self.ordered(board, list(board.legal_moves), self.best.get(key))
        if depth == 1:  # the children are leaves: their static scores in one batch
            self.prefetch(board, moves)
        for move in moves:
            board.push(move)
            try:
                score, rest = self.negamax(board, depth - 1, -beta, -alpha, ply + 1)
            finally:
                board.pop()
            if -score > alpha:
                alpha, line, best_move = -score, [move, *rest], move
                if alpha >= beta:
                    break
        if best_move is not None:
            self.best[key] = best_move
        return alpha, line

    def quiescence(self, board: chess.Board, alpha: int, beta: int) -> int:
        """Captures only, until the position is quiet: the side to move may also stand on the static score."""
        self.count()
        stand = self.static_score(board)
        if stand >= beta:
            return stand
        alpha = max(alpha, stand)
        captures = self.ordered(board, [move for move in board.legal_moves if board.is_capture(move)])
        self.prefetch(board, captures)
        for move in captures:
            board.push(move)
            try:
                score = -self.quiescence(board, -beta, -alpha)
            finally:
                board.pop()
            if score >= beta:
                return score
            alpha = max(alpha, score)
        return alpha

    def ended(self, board: chess.Board, ply: int) -> int | None:
        """The score of a finished game (mate, stalemate, a draw by the rules), else None."""
        if board.is_repetition(2) or board.halfmove_clock >= 100 or board.is_insufficient_material():
            return 0
        if not any(board.generate_legal_moves()):
            return -(MATE - ply) if board.is_check() else 0
        return None

    def static_score(self, board: chess.Board) -> int:
        key = position_key(board)
        if key not in self.static:
            self.static[key] = self.white_view(board, self.evaluate([board])[0])
        return self.static[key]

    def prefetch(self, board: chess.Board, moves: list[chess.Move]) -> None:
        """The children's static scores in one call of the evaluator (one batch for the network)."""
        children, keys = [], []
        for move in moves:
            board.push(move)
            key = position_key(board)
            if key not in self.static:
                children.append(board.copy(stack=False))
                keys.append(key)
            board.pop()
        if children:
            for key, child, pawns in zip(keys, children, self.evaluate(children)):
                self.static[key] = self.white_view(child, pawns)

    @staticmethod
    def white_view(board: chess.Board, pawns: float) -> int:
        """Pawns from White's view as centipawns from the side to move's."""
        centipawns = int(round(pawns * 100))
        return centipawns if board.turn == chess.WHITE else -centipawns

    @staticmethod
    def ordered(board: chess.Board, moves: list[chess.Move], first: chess.Move | None = None) -> list[chess.Move]:
        def rank(move: chess.Move) -> tuple:
            victim = board.piece_type_at(move.to_square) or (chess.PAWN if board.is_en_passant(move) else 0)
            attacker = board.piece_type_at(move.from_square) or 0
            return (move != first, -victim * 10 + attacker if victim else 100, move.uci())

        return sorted(moves, key=rank)

    def count(self) -> None:
        self.nodes += 1
        if self.stop.is_set() or (self.limits.nodes is not None and self.nodes > self.limits.nodes):
            raise Stopped
        if self.limits.seconds is not None and self.nodes % 64 == 0:
            if time.monotonic() - self.started > self.limits.seconds:
                raise Stopped


# ---------------------------------------------------------------- the network as an evaluator


def network(ckpt) -> "callable":
    """A chess checkpoint's evaluator (see `evaluator`)."""
    from kibitz.tools import load_checkpoint
    from tasks.chess import CHESS

    cfg, model = load_checkpoint(ckpt, CHESS)
    return evaluator(model, cfg.data.target)


def evaluator(model, target: str) -> "callable":
    """A batch of boards in one forward pass of the chess model, on the GPU when there is one; each board's score in
    pawns from White's view."""
    import numpy as np
    import torch

    from chessdata.encoding import pack_board
    from losses import to_pawns

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    if device == "cpu":  # a node's children make a small batch: one thread is faster, and leaves a core to the opponent
        torch.set_num_threads(1)

    @torch.no_grad()
    def evaluate(boards: list[chess.Board]) -> list[float]:
        packed = torch.from_numpy(np.stack([pack_board(board) for board in boards])).to(device)
        return to_pawns(model(packed), target).reshape(-1).tolist()

    return evaluate


# ---------------------------------------------------------------- UCI


def limits_of(words: list[str], board: chess.Board) -> Limits:
    """`go`'s limits: depth, nodes, movetime, or a share of the clock (wtime/btime and their increments)."""
    values = {}
    for name, value in zip(words, words[1:]):
        if name in ("depth", "nodes", "movetime", "wtime", "btime", "winc", "binc", "movestogo"):
            if not value.lstrip("-").isdigit():
                raise ValueError(f"{name} expects a whole number, got {value!r}")
            values[name] = int(value)
    limits = Limits(depth=values.get("depth", 64), nodes=values.get("nodes"))
    if "movetime" in values:
        limits.seconds = values["movetime"] / 1000
    clock = values.get("wtime" if board.turn == chess.WHITE else "btime")
    if clock is not None:
        increment = values.get("winc" if board.turn == chess.WHITE else "binc", 0)
        moves_left = values.get("movestogo", 30)
        limits.seconds = max(0.01, min(clock / 2, clock / moves_left + increment * 0.8) / 1000)
    return limits


def position_of(words: list[str]) -> chess.Board:
    """`position startpos|fen FEN [moves m1 m2 ...]` as a board; ValueError for a bad FEN or an illegal move."""
    moves_at = words.index("moves") if "moves" in words else len(words)
    if words[:1] == ["startpos"]:
        board = chess.Board()
    elif words[:1] == ["fen"]:
        board = chess.Board(" ".join(words[1:moves_at]))
    else:
        raise ValueError("expected startpos or fen")
    for text in words[moves_at + 1 :]:
        move = chess.Move.from_uci(text)
        if move not in board.legal_moves:
            raise ValueError(f"illegal move {text} in {board.fen()}")
        board.push(move)
    return board


class Engine:
    """The UCI conversation: the position, and a search in a thread of its own so `stop` is heard while it runs."""

    def __init__(self, evaluate, name: str):
        self.evaluate, self.name, self.board = evaluate, name, chess.Board()
        self.stop, self.thread, self.infinite = threading.Event(), None, False

    def say(self, line: str) -> None:
        print(line, flush=True)

    def handle(self, line: str) -> bool:
        """One command; False after `quit`."""
        command, *words = line.split() or [""]
        if command == "uci":
            self.say(f"id name {self.name}")
            self.say("id author kibitz")
            self.say("uciok")
        elif command == "isready":  # answered at once, a search running or not
            self.say("readyok")
        elif command == "ucinewgame":
            self.finish()
            self.board = chess.Board()
        elif command == "position":
            self.finish()
            try:
                self.board = position_of(words)
            except ValueError as exc:
                print(f"error: position: {exc}", file=sys.stderr, flush=True)
        elif command == "go":
            self.finish()
            self.infinite = "infinite" in words
            try:
                self.go(Limits() if self.infinite else limits_of(words, self.board))
            except ValueError as exc:  # no search: the GUI hears of it on stderr, as of a bad position
                print(f"error: go: {exc}", file=sys.stderr, flush=True)
        elif command == "stop":
            self.wait()
        elif command == "quit":
            self.wait()
            return False
        return True

    def go(self, limits: Limits) -> None:
        self.stop.clear()
        search = Search(self.evaluate, limits, self.stop, self.say)
        board = self.board.copy()

        def think() -> None:
            move = search.run(board)
            self.say(f"bestmove {move.uci() if move else '0000'}")

        self.thread = threading.Thread(target=think, daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Ends a running search now: it answers with its best move so far."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None

    def finish(self) -> None:
        """Lets a running search end at its own limit (an infinite one ends now) before the next command."""
        if self.infinite:
            self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def main(argv: list[str]) -> int:
    if argv[:1] == ["--material"]:
        evaluate, name = material, "kibitz material"
    elif argv[:1] == ["--ckpt"] and len(argv) == 2:
        from config import ConfigError

        try:
            evaluate, name = network(argv[1]), "kibitz"
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        print("usage: python -m tasks.engine --ckpt CHECKPOINT | --material", file=sys.stderr)
        return 2
    engine = Engine(evaluate, name)
    for line in sys.stdin:
        if not engine.handle(line.strip()):
            break
    engine.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
