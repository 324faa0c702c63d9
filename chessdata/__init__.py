"""The lichess pipeline: PGN (and position-dump) sources -> packed 101-byte positions with their evals.

    python -m chessdata prepare data/sample.pgn.zst --out data/cache/sample
    python -m chessdata dump data/cache/sample --split test --limit 5
    python -m chessdata make-sample            # regenerate data/sample.pgn.zst with Stockfish

stream.py reads files (zstd, any line ending), pgn.py cuts them into games and reads the movetext and
evals (notation: evals.py), replay.py replays the moves, encoding.py packs a position into 808 bits,
sources.py reads other position sources, prepare.py and dedup.py write a prepared folder (its
format: folder.py), sample.py makes the bundled sample. Nothing here knows about training.
"""
