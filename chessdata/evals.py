"""Eval notation, read the way python-chess reads `[%eval ...]` (`chess.pgn.GameNode.eval`).

An eval is in pawns from White's view, up to two decimals (`0.17`, `-1.5`, `+3`, `.5`), or a mate: `#N` White
mates in N, `#-N` Black does. `#0` means the position is already mate: the side to move has been mated. A depth
may follow after a comma (`0.24,20`, `#-4,22`: what `GameNode.set_eval(score, depth)` writes).

Evals are stored as (centipawns int32, mate int16); a mate already given is stored as +-CHECKMATE (the sign says
who gave it), a value that does not fit is refused.
"""

import math
import re

VALUE = r"#[+-]?\d+|[+-]?(?:\d{0,10}\.\d{1,2}|\d{1,10}\.?)"
IN_COMMENT = re.compile(rf"\[%eval\s({VALUE})(?:,\d+)?\]")  # python-chess takes the first that matches
WHOLE = re.compile(rf"(?:{VALUE})(?:,\d+)?")
CP_LIMIT = 2**31 - 1  # int32
CHECKMATE = 2**15 - 1  # int16: mate already given; larger mates do not fit


class BadEval(ValueError):
    pass


def read_eval(text: str, black_to_move: bool = False) -> tuple[int, int]:
    """One eval (without the `[%eval ]` around it) -> (centipawns, mate). `0.17` -> (17, 0); `#-3` -> (0, -3);
    `#0` with White to move -> (0, -CHECKMATE). Raises BadEval for anything unreadable or out of range."""
    if not WHOLE.fullmatch(text):
        raise BadEval(f"not an eval: {text!r}")
    value = text.partition(",")[0]
    if value.startswith("#"):
        mate = int(value[1:])
        if mate == 0:
            return 0, CHECKMATE if black_to_move else -CHECKMATE
        if abs(mate) >= CHECKMATE:
            raise BadEval(f"mate out of range: {text!r}")
        return 0, mate
    return pawns_to_cp(float(value)), 0


def pawns_to_cp(pawns: float) -> int:
    """Pawns (any finite float) -> centipawns, refused (BadEval) when not finite or beyond int32."""
    if not math.isfinite(pawns) or abs(pawns) * 100 > CP_LIMIT:
        raise BadEval(f"eval out of range: {pawns!r} pawns")
    return round(pawns * 100)


def checked(cp: object, mate: object, black_to_move: bool) -> tuple[int, int]:
    """Integer centipawns or a mate (0: the side to move is mated) from a structured source such as the eval
    database; refused (BadEval) unless they are integers that fit their columns."""
    for value in (cp, mate):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadEval(f"not an integer eval: {value!r}")
    if mate is not None:
        if mate == 0:
            return 0, CHECKMATE if black_to_move else -CHECKMATE
        if abs(mate) >= CHECKMATE:
            raise BadEval(f"mate out of range: {mate}")
        return 0, mate
    if cp is None or abs(cp) > CP_LIMIT:
        raise BadEval(f"eval out of range or missing: {cp!r}")
    return cp, 0


def format_eval(cp: int, mate: int) -> str:
    """(centipawns, mate) -> the notation: `0.17`, `-1.50`, `#3`, `#-2`, `#0` (read back with the side to move)."""
    if abs(mate) == CHECKMATE:
        return "#0"
    return f"#{mate}" if mate else f"{cp / 100:.2f}"
