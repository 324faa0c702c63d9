"""Turn lichess PGN archives (and position sources, see sources.py) into packed training data, on
all cores, restartably.

The main process streams games out of each archive, drops games without `%eval` or of another
variant on the raw text (hundreds of MB/s), and cuts the rest into chunks of a fixed number of
games *read*, so chunks, and with them the output, do not depend on the worker count. Workers
replay the chunks (replay.py); results come back in order and are written as shards, each with a
small JSON written last. A re-run after a crash skips the shards already complete. At the end the
shards are joined into one file per split and column, and `meta.json` is written last of all.
"""

import collections
import contextlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chessdata import dedup
from chessdata import sources as sources_module
from chessdata.encoding import ROW_BYTES, pack_states
from chessdata.folder import COLUMNS, LAYOUT_VERSION, SPLITS, split_of, write_npy_header
from chessdata.pgn import BadGame, CorruptArchive, game_positions, iter_games, raw_variant
from chessdata.stream import Progress, fingerprint


@dataclass(frozen=True)
class Filters:
    """Which games to keep (header-based filters are off when unset)."""

    val_fraction: float = 0.05
    test_fraction: float = 0.05
    min_ply: int = 0
    min_elo: int | None = None
    max_elo: int | None = None
    time_controls: tuple[str, ...] | None = None
    dedup: bool = True


def header_filter(headers: dict[str, str], filters: Filters) -> str | None:
    """The reason a game is filtered out by its headers, or None to keep it."""
    if filters.time_controls is not None and headers.get("TimeControl") not in filters.time_controls:
        return "filtered_time_control"
    if filters.min_elo is not None or filters.max_elo is not None:
        for side in ("WhiteElo", "BlackElo"):
            elo = headers.get(side, "?")
            if not elo.isdigit():
                return "filtered_elo"
            if filters.min_elo is not None and int(elo) < filters.min_elo:
                return "filtered_elo"
            if filters.max_elo is not None and int(elo) > filters.max_elo:
                return "filtered_elo"
    return None


def parse_chunk(games: list[str], filters: Filters) -> tuple[dict, collections.Counter, collections.Counter]:
    """Replay a chunk of games: per split the packed rows, cps and mates; games kept per split (and, as
    `truncated_<reason>`, those kept only up to an illegal or null move); skips by reason."""
    states = {split: ([], [], []) for split in SPLITS}
    kept: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    for game in games:
        try:
            headers, game_states, cps, mates, truncated = game_positions(game)
        except BadGame as bad:
            skipped[bad.reason] += 1
            continue
        if truncated and not game_states:
            skipped[truncated] += 1  # nothing before the bad move to keep
            continue
        reason = header_filter(headers, filters)
        if reason is None and not game_states:
            reason = "no_eval"
        if reason is None and filters.min_ply and game_states and len(game_states) < filters.min_ply:
            reason = "too_short"
        if reason:
            skipped[reason] += 1
            continue
        split = split_of(game, filters.val_fraction, filters.test_fraction)
        kept[split] += 1
        if truncated:
            kept["truncated_" + truncated] += 1
        for column, values in zip(states[split], (game_states, cps, mates)):
            column.extend(values)
    arrays = {
        split: {"positions": pack_states(s), "cp": np.array(c, dtype=np.int32), "mate": np.array(m, dtype=np.int16)}
        for split, (s, c, m) in states.items()
    }
    return arrays, kept, skipped


def raw_chunks(sources: list[Path], records_per_chunk: int, max_records: int | None):
    """Yield (kind, records worth parsing, records read, raw skips, input mark) per chunk of `records_per_chunk`
    games or positions read. A chunk never spans two sources (each has one kind); its mark says which bytes of
    its source had been read when it was cut (see stream.Progress)."""
    read = 0
    for source in sources:
        kind = sources_module.kind_of(source)
        progress = Progress()
        if kind == "pgn":
            records = iter_games(source, progress)
        else:
            records = sources_module.iter_records(source, kind, progress)
        chunk, skipped, read_in_chunk = [], collections.Counter(), 0
        for record in records:
            if max_records is not None and read >= max_records:
                break
            read += 1
            read_in_chunk += 1
            if kind != "pgn":
                chunk.append(record)
            elif isinstance(record, BadGame):  # damage the game cutter found
                skipped[record.reason] += 1
            elif "%eval" not in record:  # the raw-text test: most lichess games carry no eval
                skipped["no_eval"] += 1
            elif raw_variant(record):
                skipped["variant"] += 1
            else:
                chunk.append(record)
            if read_in_chunk == records_per_chunk:
                yield kind, chunk, read_in_chunk, skipped, f"{source}:{progress.mark()}"
                chunk, skipped, read_in_chunk = [], collections.Counter(), 0
        if read_in_chunk:
            yield kind, chunk, read_in_chunk, skipped, f"{source}:{progress.mark()}"


def parse_any(kind: str, records: list, filters: Filters):
    if kind == "pgn":
        return parse_chunk(records, filters)
    return sources_module.parse_position_chunk(kind, records, filters)


def finished_shard(shards: Path, index: int, mark: str) -> dict | None:
    """The info of shard `index` if an earlier run completed it from the same input bytes, else None."""
    done = shards / f"{index:06d}.json"
    if not (done.is_file() and done.with_suffix(".npz").is_file()):
        return None
    try:
        info = json.loads(done.read_text())
    except ValueError:
        return None
    return info if info.get("input") == mark else None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(".tmp-" + path.name)  # same suffix: np.save would append .npy otherwise
    write(tmp)
    os.replace(tmp, path)


def write_shard(shards: Path, index: int, arrays: dict, kind: str, read: int, kept, skipped, mark: str) -> dict:
    # one file for every split and column: a shard of a few hundred games costs one file write, not nine
    columns = {f"{split}.{name}": values for split, named in arrays.items() for name, values in named.items()}
    _write_atomic(shards / f"{index:06d}.npz", lambda tmp: np.savez(tmp, **columns))
    info = {
        "input": mark,
        "kind": kind,
        "read": read,
        "kept": dict(kept),
        "skipped": dict(skipped),
        "positions": {split: len(arrays[split]["cp"]) for split in SPLITS},
    }
    _write_atomic(shards / f"{index:06d}.json", lambda tmp: tmp.write_text(json.dumps(info)))
    return info


def join_shards(shards: Path, out: Path, infos: list[dict]) -> None:
    """Concatenate the shards of each split and column into `out/<split>/<column>.npy`, a shard at a time."""
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        total = sum(info["positions"][split] for info in infos)
        for name, dtype in COLUMNS.items():
            tmp = out / split / f"{name}.tmp.npy"
            with open(tmp, "wb") as joined:
                write_npy_header(joined, dtype, (total, ROW_BYTES) if name == "positions" else (total,))
                for index, info in enumerate(infos):
                    if info["positions"][split]:
                        with np.load(shards / f"{index:06d}.npz") as shard:
                            joined.write(np.ascontiguousarray(shard[f"{split}.{name}"], dtype=dtype).data)
            os.replace(tmp, out / split / f"{name}.npy")


def recipe_of(sources: list[Path], filters: Filters, max_games: int | None, games_per_chunk: int) -> dict:
    """What the output depends on beside the sources' bytes (and not the worker count): shards are reused only
    under the same recipe, and each only if the bytes it was cut from are unchanged (Progress marks)."""
    recipe = {
        "layout_version": LAYOUT_VERSION,
        "sources": [str(source) for source in sources],
        "games_per_chunk": games_per_chunk,
        "max_games": max_games,
        "filters": vars(filters),
    }
    return json.loads(json.dumps(recipe))  # tuples as lists, as they come back from a file


@contextlib.contextmanager
def locked(out: Path):
    """Take turns on one output folder, through a lock file beside it: jobs that reach it together (two
    `prepare`s, the first rank of each node on a shared filesystem) would otherwise write the same files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        except (ImportError, OSError):  # no fcntl (Windows), or a filesystem without locks: no turn-taking
            pass
        yield


def prepare(
    sources: list[Path],
    out: Path,
    filters: Filters = Filters(),
    max_games: int | None = None,
    workers: int = 0,
    games_per_chunk: int = 20_000,
    dedup_memory: float = 2e9,
) -> dict:
    """Prepare `out` from lichess PGN `sources`; see the module docstring. workers=0: all cores. Peak memory:
    the workers' chunks (about `games_per_chunk` games each, two per worker in flight) and, with dedup, about
    `dedup_memory` bytes; not the size of the data."""
    if not (dedup_memory > 0 and games_per_chunk > 0):
        raise SystemExit(
            f"error: dedup memory and games per chunk: expected > 0, got {dedup_memory}, {games_per_chunk}"
        )
    check_paths(sources, out)
    with locked(out):
        return _prepare(sources, out, filters, max_games, workers, games_per_chunk, dedup_memory)


def check_paths(sources: list[Path], out: Path, hint: str = "") -> None:
    for source in sources:
        if not source.is_file():
            raise SystemExit(
                f"error: {source}: no such file (expected .pgn, .jsonl, .csv (optionally .zst) or .db{hint})"
            )
        sources_module.kind_of(source)  # an unknown type fails before any work
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out}: is a file; expected a folder for the prepared data")


def _shards_folder(out: Path, recipe: dict) -> Path:
    """The folder of finished shards, kept from an interrupted run of the same recipe, else emptied."""
    shards = out / "shards"
    for leftover in out.glob(".shards-done-*"):  # a cleanup that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    recipe_file = shards / "recipe.json"
    if shards.is_dir() and (not recipe_file.is_file() or json.loads(recipe_file.read_text() or "null") != recipe):
        print(f"{shards}: left by a preparation of other sources or settings; starting over")
        shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    _write_atomic(recipe_file, lambda tmp: tmp.write_text(json.dumps(recipe)))
    return shards


def _prepare(sources, out, filters, max_games, workers, games_per_chunk, dedup_memory=2e9) -> dict:
    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    recipe = recipe_of(sources, filters, max_games, games_per_chunk)
    shards = _shards_folder(out, recipe)
    infos: list[dict] = []
    resumed = 0

    def finish(index: int, result, kind: str, read: int, raw_skipped, mark: str) -> None:
        arrays, kept, skipped = result
        infos.append(write_shard(shards, index, arrays, kind, read, kept, skipped + raw_skipped, mark))

    # fork where it is safe: on Linux, from a process with no other thread (e.g. `python -m chessdata
    # prepare`). spawn re-imports the caller's script and torch in every worker (seconds), but a fork
    # taken while another thread (wandb, the histogram sender) holds a lock deadlocks the child.
    safe_fork = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    method = "fork" if safe_fork else "spawn"
    # A ProcessPoolExecutor, not a Pool: when a worker dies (OOM killer, a signal) its futures fail at once,
    # where a Pool would wait forever for the lost chunk.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) if workers > 1 else None
    pending: collections.deque = collections.deque()  # at most 2 chunks per worker in flight
    completed = False
    try:
        for index, (kind, records, read, raw_skipped, mark) in enumerate(
            raw_chunks(sources, games_per_chunk, max_games)
        ):
            done = finished_shard(shards, index, mark)
            if done is not None:  # finished by an earlier, interrupted run, from the same bytes
                infos_wait(pending, finish)  # keep shard order
                infos.append(done)
                resumed += 1
                continue
            if pool is None:
                finish(index, parse_any(kind, records, filters), kind, read, raw_skipped, mark)
                continue
            pending.append((index, pool.submit(parse_any, kind, records, filters), kind, read, raw_skipped, mark))
            while len(pending) >= 2 * workers:
                index_done, result, *facts = pending.popleft()
                finish(index_done, result.result(), *facts)
        infos_wait(pending, finish)
        completed = True
    except CorruptArchive as exc:
        infos_wait(pending, finish)  # keep every shard completed before the damage
        raise SystemExit(f"error: {exc} (the {len(infos)} shards before it are kept; re-run to resume)") from None
    except BrokenProcessPool:
        raise SystemExit(
            f"error: a prepare worker died (killed by a signal, or out of memory?) on chunk {len(infos)} of "
            f"{games_per_chunk} records; the {len(infos)} shards before it are kept (re-run to resume; "
            f"--workers fewer or --games-per-chunk smaller need less memory, but start over)"
        ) from None
    finally:
        if pool is not None:
            if not completed:  # stop the chunks still being parsed now, not when they are done
                for process in list((pool._processes or {}).values()):  # no public way
                    process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
    return _join(sources, out, shards, infos, filters, recipe, dedup_memory, resumed, workers, start)


def _join(sources, out, shards, infos, filters, recipe, dedup_memory, resumed: int, workers: int, start) -> dict:
    """The shards joined into the splits, deduplicated, described in meta.json (written last), then removed."""
    join_shards(shards, out, infos)
    duplicates = dedup.deduplicate(out, dedup_memory) if filters.dedup else None  # before meta.json: a crash resumes
    games = [info for info in infos if info.get("kind", "pgn") == "pgn"]
    records = [info for info in infos if info.get("kind", "pgn") != "pgn"]
    counts = {
        split: {
            "games": sum(i["kept"].get(split, 0) for i in games),
            "records": sum(i["kept"].get(split, 0) for i in records),
            "positions": len(np.load(out / split / "cp.npy", mmap_mode="r")),
        }
        for split in SPLITS
    }
    skipped: collections.Counter = collections.Counter()
    truncated: collections.Counter = collections.Counter()
    for info in infos:
        skipped.update(info["skipped"])
        truncated.update({k.removeprefix("truncated_"): v for k, v in info["kept"].items() if k not in SPLITS})
    total = sum(c["positions"] for c in counts.values())
    read = _read_phrase(sum(i["read"] for i in games), sum(i["read"] for i in records))
    if not total:
        raise SystemExit(
            f"error: {', '.join(map(str, sources))}: no position with an eval found "
            f"(read {read}; skipped {dict(skipped) or 'none'})"
        )
    meta = {
        "layout_version": LAYOUT_VERSION,
        "sources": [str(s) for s in sources],
        "made_from": recipe,
        "fingerprints": [fingerprint(source) for source in sources],
        "games_read": sum(i["read"] for i in games),
        "records_read": sum(i["read"] for i in records),
        "splits": counts,
        "skipped": dict(skipped),
        "truncated": dict(truncated),
        "duplicates": duplicates,
        "filters": {k: v for k, v in vars(filters).items()},
        "shards": len(infos),
        "shards_resumed": resumed,
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    _write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    # out of the way in one rename, then removed: a kill during the removal leaves no half-deleted shards folder
    trash = out / f".shards-done-{os.getpid()}"
    os.replace(shards, trash)
    shutil.rmtree(trash)
    per_split = ", ".join(f"{split} {c['positions']}" for split, c in counts.items())
    kept_from = _read_phrase(sum(c["games"] for c in counts.values()), sum(c["records"] for c in counts.values()))
    print(
        f"prepared {out}: {total} positions from {kept_from} ({per_split}); skipped {dict(skipped)}"
        + (f"; cut short {dict(truncated)}" if truncated else "")
        + f"; {meta['seconds']} s on {workers} worker(s)"
    )
    return meta


def _read_phrase(games: int, records: int) -> str:
    """ "12 games", "40 records" (position sources), or both."""
    parts = [f"{games} games"] * bool(games or not records) + [f"{records} records"] * bool(records)
    return " and ".join(parts)


def infos_wait(pending: collections.deque, finish) -> None:
    """Write every chunk still in flight, in order."""
    while pending:
        index, result, *facts = pending.popleft()
        finish(index, result.result(), *facts)


def without_path(mark) -> dict:
    return {k: v for k, v in mark.items() if k != "path"} if isinstance(mark, dict) else mark


def read_meta(path: Path) -> dict | None:
    """A prepared folder's meta.json, None if there is none."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise SystemExit(
            f"error: {path}: not valid JSON ({exc}; a damaged folder: delete it to prepare again)"
        ) from None
    if not isinstance(meta, dict):
        raise SystemExit(f"error: {path}: expected a JSON object (a damaged folder: delete it to prepare again)")
    return meta


def ensure_prepared(sources: list[Path], out: Path) -> dict:
    """Prepare `out` from `sources` unless a complete preparation of the same sources is there.

    A folder prepared from other sources is never overwritten: that is refused, naming what it holds (a user's
    own prepared data, reached with the default sources, is not to be replaced by the bundled sample). The
    same sources changed on disk, or an older layout, are prepared again. Jobs take turns through the lock."""
    names = [str(source) for source in sources]
    meta = read_meta(out / "meta.json")
    if meta and meta.get("sources") == names and not all(source.is_file() for source in sources):
        print(f"{out}: its sources ({', '.join(names)}) are gone; using the folder as it was prepared")
        return meta
    check_paths(sources, out, f"; --data.sources, relative to the working directory {Path.cwd()}")
    with locked(out):
        meta = read_meta(out / "meta.json")
        if meta is not None:
            held, marks = meta.get("sources"), [fingerprint(source) for source in sources]
            # the same files reached by another path (another working directory) are the same sources
            same_bytes = [without_path(f) for f in meta.get("fingerprints") or []] == list(map(without_path, marks))
            if held != names and not same_bytes:
                raise SystemExit(
                    f"error: {out}: holds positions prepared from {', '.join(held or []) or 'unknown sources'}, not "
                    f"from {', '.join(names)}; name those sources (--data.sources) or another folder "
                    "(--data.dir); nothing was changed"
                )
            if meta.get("layout_version") == LAYOUT_VERSION and same_bytes:
                return meta
            print(f"{out}: its sources changed on disk, or its layout is older; preparing it again")
        return _prepare(sources, out, Filters(), None, 0, 20_000)
