"""How fast the engine searches, and how much of its time goes to the network: the same searches with material count
at the leaves (the baseline) and with the chess network, measured in the same run.

    python bench/engine.py --ckpt runs/x/checkpoints/last.ckpt    # the trained evaluator
    python bench/engine.py                                         # an untrained one of the default size: same speed
    python bench/engine.py --positions 2 --depth 1                 # a smoke test

Each position is one of the arena's openings (the first 8 moves of a bundled sample game). Printed for each arm: the
nodes, the seconds and the nodes per second of a depth-`--depth` search of every position, the network's nodes per
second over the baseline's, and the share of the network search's time spent inside the network (its forward pass
and the packing of the boards).
"""

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import chess  # noqa: E402

from tasks import arena, engine  # noqa: E402


def timed(evaluate):
    """`evaluate`, and a list holding the seconds spent in it so far."""
    spent = [0.0]

    def wrapper(boards: list[chess.Board]) -> list[float]:
        start = time.perf_counter()
        scores = evaluate(boards)
        spent[0] += time.perf_counter() - start
        return scores

    return wrapper, spent


def search_all(evaluate, positions: list[chess.Board], depth: int) -> tuple[int, float]:
    """The nodes and seconds of one depth-`depth` search of each position, each search with an empty cache."""
    nodes, start = 0, time.perf_counter()
    for board in positions:
        search = engine.Search(evaluate, engine.Limits(depth=depth), threading.Event(), report=lambda _: None)
        search.run(board.copy())
        nodes += search.nodes
    return nodes, time.perf_counter() - start


def the_network(ckpt: Path | None):
    if ckpt is not None:
        return engine.network(ckpt)
    from tasks.chess import CHESS, ChessConfig

    cfg = ChessConfig()
    return engine.evaluator(CHESS.build_model(cfg), cfg.data.target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="a chess checkpoint (default: an untrained model)")
    parser.add_argument("--positions", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    positions = []
    for opening in arena.openings(args.positions, 8):
        board = chess.Board()
        for move in opening:
            board.push(move)
        positions.append(board)
    if args.positions < 1 or args.depth < 1:
        parser.error("--positions and --depth must be at least 1")
    from config import ConfigError

    try:
        network, in_network = timed(the_network(args.ckpt))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    network(positions[:1])  # the first forward pass allocates: not part of a search
    in_network[0] = 0.0
    arms = {"material": search_all(engine.material, positions, args.depth)}
    arms["network"] = search_all(network, positions, args.depth)
    print(f"{len(positions)} positions, depth {args.depth}, {time.strftime('%Y-%m-%d')}")
    print(f"  {'leaves':<10}{'nodes':>9}{'seconds':>9}{'nodes/s':>9}")
    for arm, (nodes, seconds) in arms.items():
        print(f"  {arm:<10}{nodes:>9}{seconds:>9.2f}{nodes / seconds:>9.0f}")
    (material_nodes, material_seconds), (network_nodes, network_seconds) = arms["material"], arms["network"]
    ratio = (network_nodes / network_seconds) / (material_nodes / material_seconds)
    print(f"  ratio network / material nodes/s: {ratio:.3f}")
    print(f"  share of the network search's time in the network: {in_network[0] / network_seconds:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
