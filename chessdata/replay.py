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

from chessdata.encoding import (
    FLAG_BLACK_OO,
    FLAG_BLACK_OOO,
    FLAG_BLACK_TO_MOVE,
    FLAG_EN_PASSANT,
    FLAG_WHITE_OO,
    FLAG_WHITE_OOO,
    PIECE_ORDER,
)

KING, QUEEN, ROOK, BISHOP, KNIGHT, PAWN = range(6)  # plane offsets inside a colour
KIND_OF_LETTER = {"K": KING, "Q": QUEEN, "R": ROOK, "B": BISHOP, "N": KNIGHT}
SAN = re.compile(r"([NBRQK])?([a-h])?([1-8])?x?([a-h][1-8])(?:=?([NBRQ]))?[+#]?$")
H1, A1, H8, A8 = 1 << 7, 1 << 0, 1 << 63, 1 << 56


def piece_origins(kind: int, to: int, occupied: int, pieces: int) -> int:
    """The squares (a bit mask) from which one of `pieces`, a knight, bishop, rook, queen or king, reaches `to`."""
    if kind == KNIGHT:
        return KNIGHT_ATTACKS[to] & pieces
    if kind == BISHOP:
        return slider_attacks(to, occupied, BISHOP_RAYS) & pieces
    if kind == ROOK:
        return slider_attacks(to, occupied, ROOK_RAYS) & pieces
    if kind == QUEEN:
        return (slider_attacks(to, occupied, ROOK_RAYS) | slider_attacks(to, occupied, BISHOP_RAYS)) & pieces
    return KING_ATTACKS[to] & pieces


class IllegalMove(ValueError):
    pass


class NullMove(IllegalMove):
    """`--` and the other null-move spellings: legal PGN, but no position of a real game follows."""


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


KNIGHT_ATTACKS = [
    _steps(s, [(1, 2), (2, 1), (2, -1), (1, -2), (-1, -2), (-2, -1), (-2, 1), (-1, 2)]) for s in range(64)
]
KING_ATTACKS = [_steps(s, [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]) for s in range(64)]
# PAWN_ATTACKS[c][s]: squares a pawn of colour c (0 white) on s attacks.
PAWN_ATTACKS = [[_steps(s, [(-1, 1), (1, 1)]) for s in range(64)], [_steps(s, [(-1, -1), (1, -1)]) for s in range(64)]]
# Rays per direction; for increasing directions the nearest blocker is the lowest bit, else the highest.
ROOK_RAYS = [
    ([_ray(s, df, dr) for s in range(64)], up)
    for df, dr, up in [(0, 1, True), (1, 0, True), (0, -1, False), (-1, 0, False)]
]
BISHOP_RAYS = [
    ([_ray(s, df, dr) for s in range(64)], up)
    for df, dr, up in [(1, 1, True), (-1, 1, True), (1, -1, False), (-1, -1, False)]
]
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


FILE_MASKS = {f: 0x0101010101010101 << (ord(f) - 97) for f in "abcdefgh"}
RANK_MASKS = {r: 0xFF << 8 * (ord(r) - 49) for r in "12345678"}
ALL = (1 << 64) - 1
_parsed: dict[str, tuple | None] = {}  # SAN text -> its parts; games repeat the same few thousand SANs


def parse_san(san: str) -> tuple | None:
    """(kind, origin mask, destination, promotion kind or None, capture sign, pawn from-file) or None
    when the fast path should not try (odd notation)."""
    parts = _parsed.get(san, False)
    if parts is not False:
        return parts
    match = None if san.startswith("O") else SAN.match(san)
    if match is None:
        parts = None
    else:
        letter, from_file, from_rank, target, promotion = match.groups()
        origin_mask = (FILE_MASKS[from_file] if from_file else ALL) & (RANK_MASKS[from_rank] if from_rank else ALL)
        parts = (
            KIND_OF_LETTER[letter] if letter else PAWN,
            origin_mask,
            chess.parse_square(target),
            KIND_OF_LETTER[promotion] if promotion else None,
            "x" in san,
            ord(from_file) - 97 if from_file and not letter and not from_rank else None,
        )
        if not letter and (from_rank or (from_file is None and "x" in san)):
            parts = None  # pawn moves written like e2e4 or xd5: python-chess decides
    if len(_parsed) < 100_000:
        _parsed[san] = parts
    return parts


class FastBoard:
    """A position as 12 piece masks plus the counters, with SAN moves applied in place."""

    __slots__ = ("planes", "occupied", "turn", "castling", "ep", "halfmove", "fullmove", "in_check")

    def __init__(self):
        self._read(chess.Board())

    def state(self) -> tuple:
        """The same tuple as encoding.board_state."""
        c = self.castling
        flags = (
            (FLAG_WHITE_OO if c & H1 else 0)
            | (FLAG_WHITE_OOO if c & A1 else 0)
            | (FLAG_BLACK_OO if c & H8 else 0)
            | (FLAG_BLACK_OOO if c & A8 else 0)
            | (FLAG_BLACK_TO_MOVE if self.turn else 0)
            | (FLAG_EN_PASSANT if self.ep >= 0 else 0)
        )
        return (*self.planes, self.halfmove, self.fullmove, self.ep, flags)

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
        """Apply one SAN move; raise IllegalMove if python-chess would refuse it. The fast path
        returns early; whatever it cannot decide alone falls through to python-chess."""
        if san.startswith("O-O"):
            if san.rstrip("+#") in ("O-O", "O-O-O") and self._castle(san.startswith("O-O-O")):
                return
        else:
            parts = parse_san(san)
            if parts is not None and self._push_fast(san, *parts):
                return
        self._push_reference(san)

    def _castle(self, long: bool) -> bool:
        """O-O / O-O-O when plainly legal; anything doubtful is left to python-chess."""
        p, occ, us = self.planes, self.occupied, self.turn
        them, o, base = 1 - us, 6 * us, 56 * us
        king, rook = base + 4, base + (0 if long else 7)
        between = (0b1110 if long else 0b1100000) << base  # b-d or f-g
        crossed = (3, 2) if long else (5, 6)  # squares the king passes and lands on
        occupied = occ[0] | occ[1]
        if (
            not self.castling >> rook & 1
            or not p[o + KING] >> king & 1
            or not p[o + ROOK] >> rook & 1
            or occupied & between
            or self.in_check
            or any(self.attacked(base + square, them, occupied) for square in crossed)
        ):
            return False
        king_to, rook_to = base + (2 if long else 6), base + (3 if long else 5)
        p[o + KING] ^= (1 << king) | (1 << king_to)
        p[o + ROOK] ^= (1 << rook) | (1 << rook_to)
        occ[us] ^= (1 << king) | (1 << king_to) | (1 << rook) | (1 << rook_to)
        self.castling &= ~(0xFF << base)
        self.ep = -1
        self.halfmove += 1
        if us:
            self.fullmove += 1
        self.turn = them
        enemy_king = p[6 * them + KING].bit_length() - 1
        self.in_check = self.attacked(enemy_king, us, occ[0] | occ[1])
        return True

    def _push_fast(self, san: str, kind: int, origin_mask: int, to: int, promotion, capture_sign, pawn_file) -> bool:
        p, occ = self.planes, self.occupied
        us = self.turn
        them = 1 - us
        o, t = 6 * us, 6 * them
        to_bit = 1 << to
        mine, theirs = occ[us], occ[them]
        if to_bit & mine:
            raise IllegalMove(san)
        occupied = mine | theirs
        en_passant = False
        if kind == PAWN:
            forward = 8 if us == 0 else -8
            if (promotion is not None) != (to >> 3 == (7 if us == 0 else 0)):
                return False
            found = self._pawn_origin(to, forward, occupied, theirs, p[o + PAWN], capture_sign, pawn_file)
            if found is None:
                return False
            candidates, en_passant = found
        else:
            if capture_sign and not to_bit & theirs:
                return False  # a capture sign with nothing to capture: python-chess decides
            candidates = piece_origins(kind, to, occupied, p[o + kind]) & origin_mask
        if not candidates or candidates & (candidates - 1):
            return False  # none, or several pieces fit (one must be pinned): python-chess decides
        from_bit = candidates
        origin = from_bit.bit_length() - 1

        captured = bool(to_bit & theirs)
        if captured:
            self._remove_captured(to_bit, t, them, san)
        victim_bit = 0
        if en_passant:
            victim_bit = 1 << (to - forward)
            p[t + PAWN] ^= victim_bit
            occ[them] ^= victim_bit
            captured = True
        p[o + kind] ^= from_bit
        p[o + (kind if promotion is None else promotion)] |= to_bit
        occ[us] ^= from_bit | to_bit
        after = occ[0] | occ[1]
        # A move can leave its own king in check only if the king moved, the piece stood on a line
        # with its king (a pin), en passant took two pieces off a line, or the king was in check.
        king = p[o + KING].bit_length() - 1
        if (kind == KING or en_passant or self.in_check or ALIGNED[king] & from_bit) and self.attacked(
            king, them, after
        ):
            raise IllegalMove(san)
        self.castling &= ~(from_bit | to_bit)
        if kind == KING:
            self.castling &= ~(0xFF << 56 if us else 0xFF)
        self.ep = (origin + to) >> 1 if kind == PAWN and (to - origin == 16 or origin - to == 16) else -1
        self.halfmove = 0 if kind == PAWN or captured else self.halfmove + 1
        if us:
            self.fullmove += 1
        self.turn = them
        # The mover gives check only through the moved piece or a line it (or a captured pawn) left.
        enemy_king = p[t + KING].bit_length() - 1
        self.in_check = bool(
            (ALIGNED[enemy_king] & (from_bit | to_bit | victim_bit) or KNIGHT_ATTACKS[enemy_king] & to_bit)
            and self.attacked(enemy_king, us, after)
        )
        return True

    def _remove_captured(self, to_bit: int, first_plane: int, them: int, san: str) -> None:
        p = self.planes
        if p[first_plane + KING] & to_bit:
            raise IllegalMove(san)
        for plane in range(first_plane + 1, first_plane + 6):
            if p[plane] & to_bit:
                p[plane] ^= to_bit
                break
        self.occupied[them] ^= to_bit

    def _pawn_origin(self, to: int, forward: int, occupied: int, theirs: int, pawns: int, capture_sign, pawn_file):
        """(the one-bit mask of the pawn that moves to `to`, 0 if none; whether it takes en passant), or None where
        the move cannot be a pawn's."""
        to_bit = 1 << to
        if pawn_file is not None:  # a capture: exd5
            en_passant = to == self.ep and not to_bit & occupied
            if abs(pawn_file - (to & 7)) != 1 or not (to_bit & theirs or en_passant):
                return None
            origin = to - forward + pawn_file - (to & 7)
            return ((1 << origin) & pawns if 0 <= origin < 64 else 0), en_passant
        if to_bit & occupied or capture_sign:  # a push: one square, or two from the home rank
            return None
        one = to - forward
        if 0 <= one < 64 and pawns >> one & 1:
            return 1 << one, False
        if to >> 3 == (3 if forward == 8 else 4) and not occupied >> one & 1:
            return (1 << (one - forward)) & pawns, False
        return 0, False

    @classmethod
    def from_board(cls, board: chess.Board) -> "FastBoard":
        fast = cls.__new__(cls)
        fast._read(board)
        return fast

    def _read(self, board: chess.Board) -> None:
        self.planes = [board.pieces_mask(kind, color) for color, kind in PIECE_ORDER]
        self.occupied = [board.occupied_co[chess.WHITE], board.occupied_co[chess.BLACK]]
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
            raise NullMove(san)
        board.push(move)
        self._read(board)
