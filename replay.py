"""Fast replay of SAN moves on bitboard integers, without chess.Board.

python-chess resolves a SAN by generating every legal move (about 11 us a move). Here a SAN is
resolved the way a person reads it: the destination square, then the few pieces of the named kind
that attack it (attack tables; sliding pieces by the nearest blocker on each ray), then a legality
check only where one can fail (a piece on a line with its own king, king moves, en passant, and
moves made while in check). Anything unusual (ambiguity, castling through check, odd SAN) goes to
python-chess, which stays the reference: tests replay large corpora both ways and compare.

Squares and bits follow python-chess: a1 = 0, bit s = 1 << s. Piece planes follow encoding.py:
WK WQ WR WB WN WP BK BQ BR BB BN BP (plane = 6 * colour + kind).
"""

import re

import chess

from encoding import (FLAG_BLACK_OO, FLAG_BLACK_OOO, FLAG_BLACK_TO_MOVE, FLAG_EN_PASSANT, FLAG_WHITE_OO,
                      FLAG_WHITE_OOO, PIECE_ORDER)

KING, QUEEN, ROOK, BISHOP, KNIGHT, PAWN = range(6)  # plane offsets inside a colour
KIND_OF_LETTER = {"K": KING, "Q": QUEEN, "R": ROOK, "B": BISHOP, "N": KNIGHT}
SAN = re.compile(r"([NBRQK])?([a-h])?([1-8])?x?([a-h][1-8])(?:=?([NBRQ]))?[+#]?$")
H1, A1, H8, A8 = 1 << 7, 1 << 0, 1 << 63, 1 << 56


class IllegalMove(ValueError):
    pass


def _steps(square: int, deltas) -> int:
    mask, file, rank = 0, square % 8, square // 8
    for df, dr in deltas:
        f, r = file + df, rank + dr
        if 0 <= f < 8 and 0 <= r < 8:
            mask |= 1 << (r * 8 + f)
    return mask


def _ray(square: int, df: int, dr: int) -> int:
    mask, f, r = 0, square % 8 + df, square // 8 + dr
    while 0 <= f < 8 and 0 <= r < 8:
        mask |= 1 << (r * 8 + f)
        f, r = f + df, r + dr
    return mask


KNIGHT_ATTACKS = [_steps(s, [(1, 2), (2, 1), (2, -1), (1, -2), (-1, -2), (-2, -1), (-2, 1), (-1, 2)]) for s in range(64)]
KING_ATTACKS = [_steps(s, [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]) for s in range(64)]
# PAWN_ATTACKS[c][s]: squares a pawn of colour c (0 white) on s attacks.
PAWN_ATTACKS = [[_steps(s, [(-1, 1), (1, 1)]) for s in range(64)], [_steps(s, [(-1, -1), (1, -1)]) for s in range(64)]]
# Rays per direction; for increasing directions the nearest blocker is the lowest bit, else the highest.
ROOK_RAYS = [([_ray(s, df, dr) for s in range(64)], up) for df, dr, up in [(0, 1, True), (1, 0, True), (0, -1, False), (-1, 0, False)]]
BISHOP_RAYS = [([_ray(s, df, dr) for s in range(64)], up) for df, dr, up in [(1, 1, True), (-1, 1, True), (1, -1, False), (-1, -1, False)]]
ROOK_EMPTY = [_ray(s, 0, 1) | _ray(s, 1, 0) | _ray(s, 0, -1) | _ray(s, -1, 0) for s in range(64)]
BISHOP_EMPTY = [_ray(s, 1, 1) | _ray(s, -1, 1) | _ray(s, 1, -1) | _ray(s, -1, -1) for s in range(64)]
ALIGNED = [ROOK_EMPTY[s] | BISHOP_EMPTY[s] for s in range(64)]  # squares sharing a line with s


def slider_attacks(square: int, occupied: int, rays) -> int:
    attacks = 0
    for table, up in rays:
        ray = table[square]
        blockers = ray & occupied
        if blockers:
            nearest = (blockers & -blockers).bit_length() - 1 if up else blockers.bit_length() - 1
            ray ^= table[nearest]
        attacks |= ray
    return attacks


class FastBoard:
    """A position as 12 piece masks plus the counters, with SAN moves applied in place."""

    __slots__ = ("planes", "turn", "castling", "ep", "halfmove", "fullmove", "in_check")

    def __init__(self):
        board = chess.Board()
        self.planes = [board.pieces_mask(kind, color) for color, kind in PIECE_ORDER]
        self.turn, self.castling, self.ep, self.halfmove, self.fullmove = 0, A1 | H1 | A8 | H8, -1, 0, 1
        self.in_check = False

    def state(self) -> tuple:
        """The same tuple as encoding.board_state."""
        c = self.castling
        flags = ((FLAG_WHITE_OO if c & H1 else 0) | (FLAG_WHITE_OOO if c & A1 else 0)
                 | (FLAG_BLACK_OO if c & H8 else 0) | (FLAG_BLACK_OOO if c & A8 else 0)
                 | (FLAG_BLACK_TO_MOVE if self.turn else 0) | (FLAG_EN_PASSANT if self.ep >= 0 else 0))
        return (*self.planes, self.halfmove, self.fullmove, self.ep, flags)

    def occupied(self, color: int) -> int:
        p = self.planes
        o = 6 * color
        return p[o] | p[o + 1] | p[o + 2] | p[o + 3] | p[o + 4] | p[o + 5]

    def attacked(self, square: int, by: int, occupied: int) -> bool:
        """Is `square` attacked by colour `by` (given all occupied squares)?"""
        p, o = self.planes, 6 * by
        if KNIGHT_ATTACKS[square] & p[o + KNIGHT] or KING_ATTACKS[square] & p[o + KING]:
            return True
        if PAWN_ATTACKS[1 - by][square] & p[o + PAWN]:
            return True
        rooks, bishops = p[o + ROOK] | p[o + QUEEN], p[o + BISHOP] | p[o + QUEEN]
        if rooks & ROOK_EMPTY[square] and slider_attacks(square, occupied, ROOK_RAYS) & rooks:
            return True
        return bool(bishops & BISHOP_EMPTY[square] and slider_attacks(square, occupied, BISHOP_RAYS) & bishops)

    def push_san(self, san: str) -> None:
        """Apply one SAN move; raise IllegalMove if python-chess would refuse it."""
        try:
            if san.startswith("O-O"):
                raise LookupError  # castling: rare, python-chess checks the squares it crosses
            self._push_fast(san)
        except LookupError:  # the fast path cannot decide alone
            self._push_reference(san)

    def _push_fast(self, san: str) -> None:
        match = SAN.match(san)
        if match is None:
            raise LookupError
        letter, from_file, from_rank, target, promotion = match.groups()
        to = (ord(target[0]) - 97) + 8 * (ord(target[1]) - 49)
        us, them = self.turn, 1 - self.turn
        p = self.planes
        mine, theirs = self.occupied(us), self.occupied(them)
        occupied = mine | theirs
        to_bit = 1 << to
        if to_bit & mine:
            raise IllegalMove(san)
        kind = KIND_OF_LETTER[letter] if letter else PAWN
        o = 6 * us
        en_passant = False
        if kind == PAWN:
            forward = 8 if us == 0 else -8
            last_rank = to // 8 == (7 if us == 0 else 0)
            if bool(promotion) != last_rank or from_rank is not None:
                raise LookupError
            if from_file is not None:  # a capture: exd5
                origin = to - forward + (ord(from_file) - 97) - to % 8
                if abs((ord(from_file) - 97) - to % 8) != 1 or not 0 <= origin < 64:
                    raise LookupError
                en_passant = to == self.ep and not to_bit & occupied
                if not (to_bit & theirs or en_passant):
                    raise LookupError
                candidates = (1 << origin) & p[o + PAWN]
            else:  # a push: one square, or two from the home rank
                if to_bit & occupied or "x" in san:
                    raise LookupError
                one = to - forward
                if 0 <= one < 64 and p[o + PAWN] >> one & 1:
                    candidates = 1 << one
                elif to // 8 == (3 if us == 0 else 4) and not occupied >> one & 1:
                    candidates = (1 << (one - forward)) & p[o + PAWN]
                else:
                    candidates = 0
        elif kind == KNIGHT:
            candidates = KNIGHT_ATTACKS[to] & p[o + KNIGHT]
        elif kind == KING:
            candidates = KING_ATTACKS[to] & p[o + KING]
        elif kind == BISHOP:
            candidates = slider_attacks(to, occupied, BISHOP_RAYS) & p[o + BISHOP]
        elif kind == ROOK:
            candidates = slider_attacks(to, occupied, ROOK_RAYS) & p[o + ROOK]
        else:
            candidates = (slider_attacks(to, occupied, ROOK_RAYS) | slider_attacks(to, occupied, BISHOP_RAYS)) & p[o + QUEEN]
        if kind != PAWN:
            if "x" in san and not to_bit & theirs:
                raise LookupError  # a capture sign with nothing to capture: python-chess decides
            if from_file is not None:
                candidates &= 0x0101010101010101 << (ord(from_file) - 97)
            if from_rank is not None:
                candidates &= 0xFF << 8 * (ord(from_rank) - 49)
        if not candidates:
            raise LookupError  # let python-chess decide (and name the problem)
        if candidates & (candidates - 1):
            raise LookupError  # several pieces fit: one of them must be pinned
        origin = candidates.bit_length() - 1
        self._apply(origin, to, kind, KIND_OF_LETTER[promotion] if promotion else None, en_passant, occupied, san)

    def _apply(self, origin: int, to: int, kind: int, promotion: int | None, en_passant: bool, occupied: int,
               san: str) -> None:
        p = self.planes
        us, them = self.turn, 1 - self.turn
        o, t = 6 * us, 6 * them
        from_bit, to_bit = 1 << origin, 1 << to
        captured = False
        for plane in range(t, t + 6):
            if p[plane] & to_bit:
                if plane == t + KING:
                    raise IllegalMove(san)
                p[plane] ^= to_bit
                captured = True
                break
        if en_passant:
            victim = to - 8 if us == 0 else to + 8
            p[t + PAWN] ^= 1 << victim
            captured = True
        p[o + kind] ^= from_bit
        p[o + (promotion if promotion is not None else kind)] |= to_bit
        # A move can leave its own king in check only if: the king moved, the piece stood on a line
        # with its king (a pin), en passant (two pieces leave a rank), or the king was in check.
        king = p[o + KING].bit_length() - 1
        if kind == KING or en_passant or self.in_check or ALIGNED[king] & from_bit:
            after = (occupied ^ from_bit) | to_bit
            if en_passant:
                after ^= 1 << victim
            if self.attacked(king, them, after):
                raise IllegalMove(san)
        self.castling &= ~(from_bit | to_bit)
        if kind == KING:
            self.castling &= ~(0xFF << 56 if us else 0xFF)
        self.ep = (origin + to) // 2 if kind == PAWN and abs(to - origin) == 16 else -1
        self.halfmove = 0 if kind == PAWN or captured else self.halfmove + 1
        if us == 1:
            self.fullmove += 1
        self.turn = them
        enemy_king = p[t + KING].bit_length() - 1
        self.in_check = self.attacked(enemy_king, us, self.occupied(0) | self.occupied(1))

    @classmethod
    def from_board(cls, board: chess.Board) -> "FastBoard":
        fast = cls.__new__(cls)
        fast._read(board)
        return fast

    def _read(self, board: chess.Board) -> None:
        self.planes = [board.pieces_mask(kind, color) for color, kind in PIECE_ORDER]
        self.turn = 0 if board.turn == chess.WHITE else 1
        self.castling = board.castling_rights
        self.ep = board.ep_square if board.ep_square is not None else -1
        self.halfmove, self.fullmove = board.halfmove_clock, board.fullmove_number
        self.in_check = board.is_check()

    def to_board(self) -> chess.Board:
        board = chess.Board(None)
        for plane, (color, kind) in enumerate(PIECE_ORDER):
            for square in chess.scan_forward(self.planes[plane]):
                board.set_piece_at(square, chess.Piece(kind, color))
        board.turn = chess.WHITE if self.turn == 0 else chess.BLACK
        board.castling_rights = self.castling
        board.ep_square = self.ep if self.ep >= 0 else None
        board.halfmove_clock, board.fullmove_number = self.halfmove, self.fullmove
        return board

    def _push_reference(self, san: str) -> None:
        """python-chess resolves the move; the fast state is then read back from its board."""
        board = self.to_board()
        try:
            move = board.parse_san(san)
        except ValueError:
            raise IllegalMove(san) from None
        if not move:  # a null move (`--`): no real game has one
            raise IllegalMove(san)
        board.push(move)
        self._read(board)
