"""The 808-bit board layout of the widely shared 37M-position lichess evaluations database.

A position is 101 bytes (notnil/chess `Position.MarshalBinary`):
  bytes 0..95   12 big-endian uint64 bitboards, WK WQ WR WB WN WP BK BQ BR BB BN BP;
                unpacked most-significant-bit first, bit 64*k + square is set (a1 = 0 ... h8 = 63)
  byte  96      halfmove clock (uint8)
  bytes 97..98  full-move number (uint16 big-endian)
  byte  99      en-passant square (int8; 0xFF = none; set after every double pawn push)
  byte  100     flags: bit0 white O-O, bit1 white O-O-O, bit2 black O-O, bit3 black O-O-O,
                bit4 black to move, bit5 has en passant
Positions are stored packed on disk and unpacked to 808 {0, 1} features on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the annotations name python-chess's Board; nothing here needs it at run time
    import chess

ROW_BYTES = 101
NUM_BITS = ROW_BYTES * 8  # 808
# python-chess's own values (chess.WHITE, chess.KING, ... chess.PAWN, its bitboard squares), written out so that
# training, which reads packed rows only, does not import python-chess (tests/test_encoding.py compares them).
WHITE, BLACK = True, False
KING, QUEEN, ROOK, BISHOP, KNIGHT, PAWN = 6, 5, 4, 3, 2, 1
BB_A1, BB_H1, BB_A8, BB_H8 = 1 << 0, 1 << 7, 1 << 56, 1 << 63
SQUARE_NAMES = [f"{file}{rank}" for rank in "12345678" for file in "abcdefgh"]
PIECE_ORDER = [(color, piece) for color in (WHITE, BLACK) for piece in (KING, QUEEN, ROOK, BISHOP, KNIGHT, PAWN)]
PIECE_SYMBOLS = "KQRBNPkqrbnp"  # same order as PIECE_ORDER
# Material values of the 12 planes in pawns from White's view (kings count nothing).
MATERIAL_VALUES = (0, 9, 5, 3, 3, 1, 0, -9, -5, -3, -3, -1)

# Reverse the bits of every byte: python-chess puts square s at bit s of a little-endian int,
# the layout puts square s at bit 7 - s % 8 of byte s // 8.
_REVERSED_BYTE = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)

FLAG_WHITE_OO, FLAG_WHITE_OOO, FLAG_BLACK_OO, FLAG_BLACK_OOO = 1, 2, 4, 8
FLAG_BLACK_TO_MOVE, FLAG_EN_PASSANT = 16, 32


def board_state(board: chess.Board) -> tuple:
    """The 17 integers a position is made of: 12 piece masks (python-chess bit order), then
    halfmove clock, full-move number, en-passant square (-1 = none) and flags."""
    masks = tuple(board.pieces_mask(piece, color) for color, piece in PIECE_ORDER)
    rights = board.castling_rights
    flags = (
        (FLAG_WHITE_OO if rights & BB_H1 else 0)
        | (FLAG_WHITE_OOO if rights & BB_A1 else 0)
        | (FLAG_BLACK_OO if rights & BB_H8 else 0)
        | (FLAG_BLACK_OOO if rights & BB_A8 else 0)
        | (FLAG_BLACK_TO_MOVE if board.turn == BLACK else 0)
    )
    ep = -1 if board.ep_square is None else board.ep_square
    if ep >= 0:
        flags |= FLAG_EN_PASSANT
    return masks + (board.halfmove_clock, board.fullmove_number, ep, flags)


def pack_states(states: list[tuple]) -> np.ndarray:
    """Pack many `board_state` tuples into an (N, 101) uint8 array in one batched numpy pass."""
    n = len(states)
    out = np.empty((n, ROW_BYTES), dtype=np.uint8)
    if n == 0:
        return out
    masks = np.array([s[:12] for s in states], dtype=np.uint64)  # h8 is bit 63: needs unsigned
    table = np.array([s[12:] for s in states], dtype=np.int64)
    out[:, :96] = _REVERSED_BYTE[masks.astype("<u8").view(np.uint8).reshape(n, 96)]
    out[:, 96] = np.minimum(table[:, 0], 255)
    fullmove = np.minimum(table[:, 1], 65535)
    out[:, 97] = fullmove >> 8
    out[:, 98] = fullmove & 0xFF
    out[:, 99] = np.where(table[:, 2] < 0, 0xFF, table[:, 2])
    out[:, 100] = table[:, 3]
    return out


def pack_board(board: chess.Board) -> np.ndarray:
    """One position as its 101 bytes."""
    return pack_states([board_state(board)])[0]


def pack_fen(fen: str) -> np.ndarray:
    import chess

    return pack_board(chess.Board(fen))


def row_to_fen(row: np.ndarray) -> str:
    """Rebuild a FEN from 101 stored bytes. The en-passant field is written whenever the bit is
    set (standard FEN), not only when a capture is legal."""
    row = np.asarray(row, dtype=np.uint8)
    bits = np.unpackbits(row[:96]).reshape(12, 64)
    squares = ["."] * 64
    for plane, symbol in enumerate(PIECE_SYMBOLS):
        for square in np.flatnonzero(bits[plane]):
            squares[square] = symbol
    ranks = []
    for rank in range(7, -1, -1):
        text, empty = "", 0
        for file in range(8):
            piece = squares[rank * 8 + file]
            if piece == ".":
                empty += 1
                continue
            text += (str(empty) if empty else "") + piece
            empty = 0
        ranks.append(text + (str(empty) if empty else ""))
    flags = int(row[100])
    turn = "b" if flags & FLAG_BLACK_TO_MOVE else "w"
    castling = "".join(c for c, bit in zip("KQkq", (1, 2, 4, 8)) if flags & bit) or "-"
    ep = SQUARE_NAMES[row[99]] if flags & FLAG_EN_PASSANT and row[99] < 64 else "-"
    fullmove = (int(row[97]) << 8) | int(row[98])
    return f"{'/'.join(ranks)} {turn} {castling} {ep} {int(row[96])} {fullmove}"


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 101) uint8 -> (B, 808) {0, 1} features (any byte count works), on whatever device `packed` lives on
    (shift and mask, most significant bit first, like np.unpackbits)."""
    shifts = _BIT_SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1).to(dtype)  # (B, bytes x 8), also for an empty batch


def board_tokens(packed: torch.Tensor) -> torch.Tensor:
    """(B, 101) packed rows -> (B, 64) int64 square tokens: 0 empty, 1 + plane for a piece
    (1..12 in PIECE_SYMBOLS order: K Q R B N P k q r b n p), squares a1 = 0 ... h8 = 63."""
    planes = unpack_bits(packed[:, :96], dtype=torch.uint8).reshape(-1, 12, 64)
    piece_numbers = torch.arange(1, 13, dtype=torch.uint8, device=packed.device)
    return (planes * piece_numbers[:, None]).sum(1, dtype=torch.int64)  # at most one plane per square


def material_balance(packed: torch.Tensor) -> torch.Tensor:
    """Material difference in pawns from White's view, straight from packed rows (the baseline)."""
    planes = unpack_bits(packed[:, :96]).reshape(-1, 12, 64).sum(-1)
    values = torch.tensor(MATERIAL_VALUES, dtype=planes.dtype, device=planes.device)
    return planes @ values


def _flip_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Bitboard bytes: swap the colour planes and reverse the 8 rank bytes of each plane.
    planes = [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    byte_order = [8 * planes[k] + 7 - r for k in range(12) for r in range(8)] + list(range(96, ROW_BYTES))
    ep = torch.tensor([b if b >= 64 else b ^ 56 for b in range(256)], dtype=torch.uint8)  # a3 <-> a6
    flags = torch.tensor(
        [
            ((b & 3) << 2) | ((b >> 2) & 3) | ((b & FLAG_BLACK_TO_MOVE) ^ FLAG_BLACK_TO_MOVE) | (b & ~31 & 0xFF)
            for b in range(256)
        ],
        dtype=torch.uint8,
    )
    return torch.tensor(byte_order), ep, flags


_FLIP_BYTES, _FLIP_EP, _FLIP_FLAGS = _flip_tables()


def flip_colors(packed: torch.Tensor) -> torch.Tensor:
    """The colour-mirrored positions (board flipped vertically, colours, castling rights and side to
    move swapped): the same game situation seen from the other side, so its eval is the negation."""
    device = packed.device
    flipped = packed[:, _FLIP_BYTES.to(device)]
    flipped[:, 99] = _FLIP_EP.to(device)[flipped[:, 99].long()]
    flipped[:, 100] = _FLIP_FLAGS.to(device)[flipped[:, 100].long()]
    return flipped


def random_flip(packed: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmentation: flip a random half of the batch and negate those targets (on the device)."""
    flip = torch.rand(packed.shape[0], device=packed.device) < 0.5
    packed = torch.where(flip[:, None], flip_colors(packed), packed)
    return packed, torch.where(flip, -target, target)
