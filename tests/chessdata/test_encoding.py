import chess
import numpy as np
import torch
from conftest import random_games

from chessdata import encoding


def test_worked_example_bytes():
    row = encoding.pack_fen("rnbqkbnr/pppppppp/8/8/3P4/8/PPP1PPPP/RNBQKBNR b KQkq d3 0 1")
    assert row.shape == (101,) and row.dtype == np.uint8
    assert row[:11].tobytes() == bytes.fromhex("08 00 00 00 00 00 00 00 10 00 00")
    assert row[-5:].tobytes() == bytes.fromhex("00 00 01 13 3f")


def test_bit_index_is_64k_plus_square():
    board = chess.Board()
    bits = np.unpackbits(encoding.pack_board(board))
    for plane, (color, piece) in enumerate(encoding.PIECE_ORDER):
        squares = set(np.flatnonzero(bits[64 * plane : 64 * (plane + 1)]))
        assert squares == set(board.pieces(piece, color))


def test_bits_fen_bits_round_trip_on_random_games():
    checked = 0
    for board in random_games(40, seed=1):
        replay = chess.Board()
        for move in board.move_stack:
            replay.push(move)
            row = encoding.pack_board(replay)
            fen = encoding.row_to_fen(row)
            assert fen == replay.fen(en_passant="fen")
            assert np.array_equal(encoding.pack_fen(fen), row)
            checked += 1
    assert checked > 2000


def test_batched_packing_matches_single():
    boards = [b for b in random_games(5, seed=2)]
    states = [encoding.board_state(b) for b in boards]
    packed = encoding.pack_states(states)
    for board, row in zip(boards, packed):
        assert np.array_equal(row, encoding.pack_board(board))


def test_device_unpack_matches_numpy():
    rows = np.random.default_rng(0).integers(0, 256, size=(64, 101), dtype=np.uint8)
    bits = encoding.unpack_bits(torch.from_numpy(rows))
    assert bits.shape == (64, 808)
    assert np.array_equal(bits.numpy().astype(np.uint8), np.unpackbits(rows, axis=1))


def test_material_balance():
    row = encoding.pack_fen("4k3/8/8/8/8/8/PPP5/RN2K3 w - - 0 1")  # R + N + 3P for White
    assert encoding.material_balance(torch.from_numpy(row[None])).item() == 11
    row = encoding.pack_fen("q3k3/8/8/8/8/8/8/4K3 w - - 0 1")
    assert encoding.material_balance(torch.from_numpy(row[None])).item() == -9


def test_flip_colors_matches_python_chess_mirror():
    rows, mirrored = [], []
    for board in random_games(10, seed=3):
        replay = chess.Board()
        for move in board.move_stack:
            replay.push(move)
            rows.append(encoding.pack_board(replay))
            mirrored.append(encoding.pack_board(replay.mirror()))
    flipped = encoding.flip_colors(torch.from_numpy(np.stack(rows)))
    assert np.array_equal(flipped.numpy(), np.stack(mirrored))
    # flipping twice is the identity
    assert np.array_equal(encoding.flip_colors(flipped).numpy(), np.stack(rows))


def test_random_flip_negates_flipped_targets():
    rows = torch.from_numpy(np.stack([encoding.pack_fen("4k3/8/8/8/8/8/PPP5/RN2K3 w - - 0 1")] * 256))
    target = torch.full((256,), 11.0)
    torch.manual_seed(0)
    packed, flipped_target = encoding.random_flip(rows, target)
    material = encoding.material_balance(packed)
    assert torch.equal(material, flipped_target)  # material follows the flip, sign and all
    assert 64 < (flipped_target < 0).sum() < 192


def test_the_layouts_constants_are_python_chess_own():
    assert encoding.PIECE_ORDER == [
        (color, piece)
        for color in (chess.WHITE, chess.BLACK)
        for piece in (chess.KING, chess.QUEEN, chess.ROOK, chess.BISHOP, chess.KNIGHT, chess.PAWN)
    ]
    assert (encoding.BB_A1, encoding.BB_H1, encoding.BB_A8, encoding.BB_H8) == (
        chess.BB_A1,
        chess.BB_H1,
        chess.BB_A8,
        chess.BB_H8,
    )
    assert encoding.SQUARE_NAMES == chess.SQUARE_NAMES
