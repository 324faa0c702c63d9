"""Reading PGN: cut games out of `.pgn` / `.pgn.zst` as python-chess would, pull the `%eval` annotations,
replay the moves and return every evaluated position as board-state tuples (see encoding.py).

A lichess game is its header tags, a blank line, the whole movetext on one line, a blank line:
    1. e4 { [%eval 0.17] [%clk 0:03:00] } 1... c5 { [%eval 0.19] [%clk 0:03:00] } 2. Nf3 ... 0-1
`%eval` is in pawns from White's view (`#N`: White mates in N, `#-N`: Black does) and describes the
position after the move it follows.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import chess

from chessdata import evals
from chessdata.replay import FastBoard, IllegalMove, NullMove
from chessdata.stream import CorruptArchive, Progress, read_text  # noqa: F401 - CorruptArchive: what reading raises

RESULTS = ("1-0", "0-1", "1/2-1/2", "*")
# A tag pair, as python-chess reads one (`chess.pgn.TAG_REGEX`).
_HEADER = re.compile(r'^\[([A-Za-z0-9][A-Za-z0-9_+#=:-]*)\s+"([^\r]*)"\]\s*$')
_VARIANT = re.compile(r'^\[Variant[ \t]+"([^\n]*)"\][ \t]*$', re.MULTILINE)
# One movetext token: a comment (also an unclosed one), a rest-of-line comment, an escape line, a move number, a
# result, a NAG, a variation bracket, or a SAN.
_TOKEN = re.compile(r"\{[^}]*\}|\{|;[^\n]*|(?m:^%[^\n]*)|\d+\.(?:\.\.)?|1-0|0-1|1/2-1/2|\*|\$\d+|[()]|[^\s{}()$;]+")
_MOVE_NUMBER = re.compile(r"\d+\.(?:\.\.)?$")
# Clean lichess movetext: an optional move number, a SAN (or the result), an optional comment.
_MOVE_AND_COMMENT = re.compile(r"(?:\d+\.(?:\.\.)?\s*)?([^\s{}()$]+)\s*(\{[^}]*\})?")
STANDARD = {name.lower() for name in chess.Board.aliases}  # "Standard", "From Position", ...
NULL_MOVES = {"--", "Z0", "0000", "@@@@"}  # the null-move spellings python-chess reads
MAX_GAME_CHARS = 1 << 23  # a "game" longer than this is damage (a lichess game is a few kB)
PENDING_CHARS = 1 << 20  # text without a blank-line-then-`[` beyond this goes to the line-by-line cutter


class BadGame(ValueError):
    """A game that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def iter_games(path: Path, progress: Progress | None = None) -> Iterator[str | BadGame]:
    """Yield each game's text, cut where python-chess's `read_game` ends a game: at a blank (or whitespace-only)
    line outside a comment, and also where a tag pair starts the line after a game's result (files concatenated
    without a blank line between them). A BadGame is yielded, to be counted, for a stretch too long to be a game.

    Lichess games are cut by str.split at blank-line-then-`[` (C speed: the main process cuts every game of an
    archive); a piece that is not plainly one game (comments, escapes, odd blank lines) goes through the
    line-by-line GameCutter instead. Memory stays bounded by the longest game, whatever the input."""
    cutter = GameCutter()
    pending = ""
    for text in read_text(path, progress):
        buffer = pending + text  # (a line of only spaces is no separator here: its pieces go to the cutter)
        pieces = buffer.split("\n\n[")
        pending = pieces.pop() if len(pieces) == 1 else "[" + pieces.pop()
        for i, piece in enumerate(pieces):
            game = "[" + piece if i else piece
            if cutter.idle and _plainly_one_game(game):
                yield game + "\n\n"
            else:
                yield from cutter.feed(game + "\n\n")
        if len(pending) > PENDING_CHARS:
            cut = pending.rfind("\n") + 1 or len(pending)  # no game boundary in sight: the cutter takes over
            yield from cutter.feed(pending[:cut] + ("" if cut < len(pending) else "\n"))
            pending = pending[cut:]
    if pending.strip() or not cutter.idle:
        if cutter.idle and _plainly_one_game(pending.rstrip("\n")):
            yield pending.rstrip("\n") + "\n\n"
        else:
            yield from cutter.feed(pending + "\n\n")
    yield from cutter.finish()


def _plainly_one_game(game: str) -> bool:
    """Is this piece exactly one game as the line-by-line cut reads it: tags, one blank line, moves with no blank
    line, tag line, escape line or `;` comment among them, not ending inside a comment? Lichess writes the
    moves on one line, which makes most of this a few single-character scans (memchr speed)."""
    moves = game.find("\n\n") + 2
    if (
        moves < 2
        or moves >= len(game)
        or game[0] != "["
        or game[-1] == "\n"
        or game[moves] in "%;[ \t"
        or ";" in game
        or game.rfind("{") > game.rfind("}")  # ends inside a comment: it runs on into the next piece
        or game.count("\n", 0, moves - 2) != game.count("\n[", 0, moves - 2)  # a line among the tags that is none
    ):
        return False
    if game.find("\n", moves) < 0:  # the moves on one line, as lichess writes them
        return True
    return (
        len(game) < MAX_GAME_CHARS
        and game.find("\n[", moves) < 0
        and game.find("\n%", moves) < 0
        and all(line.strip() for line in game[moves:].split("\n"))  # no blank line, nor one of only spaces
    )


class GameCutter:
    """Game boundaries line by line, as `chess.pgn.read_game` finds them: `%` escape lines and `;` comment lines
    are dropped, a comment `{...}` may span blank lines, one blank line may sit between tag pairs, and a blank line
    in the moves ends the game. Beyond python-chess, a tag pair that starts the line after a game's result starts
    the next game (files joined without a blank line). Fed whole lines; returns the games they complete."""

    def __init__(self):
        self.lines: list[str] = []
        self.size = 0
        self.phase = "between"  # between games | headers | moves
        self.blank_lines = 0  # consecutive, among the headers
        self.in_comment = False

    @property
    def idle(self) -> bool:
        return self.phase == "between"

    def feed(self, text: str) -> list:
        games = []
        for line in text.split("\n")[:-1]:
            self._line(line, games)
        return games

    def finish(self) -> list:
        games: list = []
        if not self.idle:
            self._end(games)
        return games

    def _end(self, games: list) -> None:
        if self.size > MAX_GAME_CHARS:
            games.append(BadGame("too_long", f"over {MAX_GAME_CHARS} characters without a game boundary"))
        elif self.lines:
            games.append("\n".join(self.lines) + "\n\n")
        self.lines, self.size, self.phase, self.in_comment = [], 0, "between", False

    def _keep(self, line: str) -> None:
        self.size += len(line) + 1
        if self.size <= MAX_GAME_CHARS:
            self.lines.append(line)
        else:
            self.lines = []

    def _line(self, line: str, games: list) -> None:
        blank = not line.strip()
        if self.in_comment:
            self._keep(line)
            self._scan(line)
            return
        if line.startswith(("%", ";")):
            return
        if self.phase == "between":
            if blank:
                return
            self.phase, self.blank_lines = "headers", 0
        if self.phase == "headers":
            if blank:
                self.blank_lines += 1
                if self.blank_lines == 2:  # python-chess: the headers end; this blank line is their separator
                    self.phase = "moves"
                return
            if line.startswith("["):
                self.blank_lines = 0
                self._keep(line)
                return
            self.phase = "moves"
            self._keep("")
        elif blank:
            self._end(games)
            return
        elif line.startswith("[") and _HEADER.match(line) and self._after_result():
            self._end(games)
            self.phase, self.blank_lines = "headers", 0
            self._keep(line)
            return
        self._keep(line)
        self._scan(line)

    def _after_result(self) -> bool:
        """Does the last line end with a game result? Then a tag pair on this line begins the next game."""
        return bool(self.lines) and self.lines[-1].rstrip().endswith(RESULTS)

    def _scan(self, line: str) -> None:
        """Follow `{` ... `}` across the line; a `;` outside a comment hides the rest of it."""
        if ";" not in line:  # then the last brace decides: a `{` after the last `}` leaves a comment open
            opening, closing = line.rfind("{"), line.rfind("}")
            if opening != closing:
                self.in_comment = opening > closing
            return
        at = 0
        while True:
            if self.in_comment:
                close = line.find("}", at)
                if close < 0:
                    return
                self.in_comment, at = False, close + 1
            else:
                opening, semicolon = line.find("{", at), line.find(";", at)
                if opening < 0 or 0 <= semicolon < opening:
                    return
                self.in_comment, at = True, opening + 1


def parse_headers(game: str) -> tuple[dict[str, str], str]:
    """Split a game into its tag pairs and its movetext: the tag lines come first (blank, `%` and `;` lines
    among them ignored; a `[` line that is not a tag pair too, as python-chess does), the movetext is every line
    after them, newlines kept (a `;` comment runs to the end of its line)."""
    headers = {}
    lines = game.split("\n")
    for at, line in enumerate(lines):
        if line.startswith("["):
            match = _HEADER.match(line)
            if match:
                headers[match.group(1)] = match.group(2)
        elif line.strip() and not line.startswith(("%", ";")):
            return headers, "\n".join(lines[at:]).strip()
    return headers, ""


def standard_chess(headers: dict[str, str]) -> bool:
    """Standard chess, possibly from a set-up position (lichess's "From Position"); not Chess960 or a variant."""
    return headers.get("Variant", "Standard").strip().lower() in STANDARD


def raw_variant(game: str) -> bool:
    """The raw-text test prepare runs before replaying: does the game name a variant other than standard chess?"""
    if "[Variant " not in game:
        return False
    match = _VARIANT.search(game)
    return bool(match) and match.group(1).strip().lower() not in STANDARD


def movetext_pairs(movetext: str) -> list[tuple[str, str]]:
    """The movetext as (SAN or result, the comment after it or ""), variations and NAGs dropped."""
    pairs = _MOVE_AND_COMMENT.findall(movetext)
    # One regex covers clean lichess movetext; use it only when every character is accounted for:
    # no variations, NAGs, `;` comments or escape lines, and every `{` is a comment that follows a move.
    if (
        "(" in movetext
        or ")" in movetext
        or "$" in movetext
        or ";" in movetext
        or "\n%" in movetext
        or movetext.count("{") != sum(1 for _, comment in pairs if comment)
    ):
        return _generic_pairs(movetext)
    return [(san, comment[1:-1]) for san, comment in pairs]


def _generic_pairs(movetext: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    depth = 0  # inside a (variation): skipped
    for token in _TOKEN.findall(movetext):
        if token.startswith("{"):
            if not token.endswith("}"):
                raise BadGame("broken_comment", "unclosed {")
            if depth == 0 and pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + token[1:-1])
        elif token.startswith((";", "%")):
            continue  # a comment to the end of the line, or an escape line
        elif token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth < 0:
                raise BadGame("broken_variation")
        elif not (depth or token.startswith("$") or _MOVE_NUMBER.match(token)):
            pairs.append((token, ""))
    return pairs


_eval_cache: dict[str, tuple[int, int]] = {}


def start_position(headers: dict[str, str]) -> FastBoard:
    """The board a game starts from: the standard one, or its `[FEN]` tag's (python-chess uses the tag whether
    or not `[SetUp "1"]` is there)."""
    if not standard_chess(headers):
        raise BadGame("variant", headers.get("Variant", ""))
    if "FEN" not in headers:
        return FastBoard()
    try:
        board = chess.Board(headers["FEN"])
    except ValueError:
        raise BadGame("bad_fen", headers["FEN"]) from None
    if board.has_chess960_castling_rights():
        raise BadGame("variant", "Chess960 castling rights")
    if not board.is_valid():
        raise BadGame("invalid_position", headers["FEN"])
    return FastBoard.from_board(board)


def game_positions(game: str) -> tuple[dict[str, str], list[tuple], list[int], list[int], str | None]:
    """Replay one game; return its headers, for every position that carries an eval its board state,
    centipawns and mate, and why the game was cut short (None if it was not).

    An illegal or a null move ends the replay there: the positions before it are sound and kept ("illegal_move",
    "null_move"). Raises BadGame for a game that cannot be used at all."""
    headers, movetext = parse_headers(game)
    board = start_position(headers)
    states, cps, mates = [], [], []
    result = truncated = None
    for ply, (san, comment) in enumerate(movetext_pairs(movetext)):
        if san in RESULTS:
            result = san
            break
        try:
            board.push_san(san.rstrip("!?") if san[-1] in "!?" else san)
        except IllegalMove as exc:
            truncated = "null_move" if isinstance(exc, NullMove) or san in NULL_MOVES else "illegal_move"
            break
        if comment and "%eval" in comment:
            match = evals.IN_COMMENT.search(comment)
            if match is None:
                raise BadGame("bad_eval", f"unreadable [%eval] after {san} at ply {ply}")
            text = match.group(1)
            value = _eval_cache.get(text)
            if value is None:
                try:
                    value = evals.read_eval(text, black_to_move=board.turn == 1)
                except evals.BadEval as exc:
                    raise BadGame("bad_eval", str(exc)) from None
                if len(_eval_cache) < 100_000 and abs(value[1]) != evals.CHECKMATE:  # #0 depends on the side to move
                    _eval_cache[text] = value
            states.append(board.state())
            cps.append(value[0])
            mates.append(value[1])
    if result is None and truncated is None:
        raise BadGame("missing_result")
    return headers, states, cps, mates, truncated
