"""evaluate, predict, lr-find and export-config against a real (tiny) training run."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import parse_config, tiny_args, train_losses

import losses
import train
from chessdata import cli, folder
from chessdata.encoding import row_to_fen
from tasks import predict


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert train.main(tiny_args(prepared, out, "--run-name", "t", "--train.max-steps", "16")) == 0
    return out / "t"


def printed_table(out: str) -> dict[str, float]:
    """The rows of a metrics table printed by train.print_table: `  name ... value`."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and not line.split()[0] == "metric"]
    return {row[0]: float(row[-1]) for row in rows}


def best_checkpoint(run_dir: Path) -> Path:
    best = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["best"]
    return run_dir / "checkpoints" / best[0][1]


def test_evaluate_reproduces_the_training_test_metrics(trained, prepared, capsys):
    printed = json.loads((trained / "test_metrics.json").read_text())
    assert train.main(["chess", "evaluate", "--ckpt", str(best_checkpoint(trained))]) == 0  # data dir from the ckpt
    out = capsys.readouterr().out
    assert "material baseline l1" in out
    metrics = printed_table(out)
    assert metrics["l1"] == pytest.approx(printed["test/l1"], abs=1e-4)
    assert metrics["rmse"] == pytest.approx(printed["test/rmse"], abs=1e-4)


def test_evaluate_on_another_dataset(trained, tmp_path, capsys):
    other = tmp_path / "other"
    cli.prepare([folder.SAMPLE_PGN], other, max_games=60, val_fraction=0.5, test_fraction=0.5)  # no train split
    assert (
        train.main(
            ["chess", "evaluate", "--ckpt", str(best_checkpoint(trained)), "--data.dir", str(other), "--split", "val"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "val metrics of" in out and printed_table(out)["l1"] > 0


def test_predict_agrees_with_evaluate(trained, prepared, tmp_path, capsys):
    ckpt = best_checkpoint(trained)
    split = folder.load_split(prepared, "test")
    fens = tmp_path / "fens.txt"
    fens.write_text("\n".join(row_to_fen(row) for row in split["positions"]) + "\n")
    assert predict.main(["--ckpt", str(ckpt), "--fens", str(fens)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(split["cp"])
    predictions = np.array([float(line.split("\t")[1]) for line in lines])
    targets = folder.eval_target(np.asarray(split["cp"]), np.asarray(split["mate"]), 15.0)
    printed = json.loads((trained / "test_metrics.json").read_text())
    assert np.abs(predictions - targets).mean() == pytest.approx(printed["test/l1"], abs=1e-4)


def test_predict_reads_fen_arguments_and_pgn(trained, tmp_path, capsys):
    pgn_file = tmp_path / "g.pgn"
    pgn_file.write_text('[Event "x"]\n\n1. e4 e5 2. Nf3 *\n')
    start = "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1"
    assert predict.main(["--ckpt", str(best_checkpoint(trained)), start, "--pgn", str(pgn_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        start,
        "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq e3 0 1",
        "rnbqkbnr/pppp1ppp/8/4p3/4P3/8/PPPP1PPP/RNBQKBNR w KQkq e6 0 2",
        "rnbqkbnr/pppp1ppp/8/4p3/4P3/5N2/PPPP1PPP/RNBQKB1R b KQkq - 1 2",
    ]


def test_bad_fen_and_wrong_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    ckpt = best_checkpoint(trained)
    assert predict.main(["--ckpt", str(ckpt), "rnbqkbnr/pppppppp/8/8 w"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid FEN 'rnbqkbnr/pppppppp/8/8 w'") and "\n" not in err
    other_task = tmp_path / "dvae.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["task"] = "dvae"
    torch.save(state, other_task)
    for path, message in (
        (other_task, "is a checkpoint of the 'dvae' task, expected 'chess'"),
        (Path(__file__), "cannot be loaded"),
    ):
        assert predict.main(["--ckpt", str(path), "8/8/8/8/8/8/8/K6k w - - 0 1"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert train.main(["chess", "evaluate", "--ckpt", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_lr_find_suggests_an_lr_that_trains(prepared, tmp_path, capsys):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "existing", "--train.max-steps", "4")) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "existing").rglob("*")}
    big_batch = ["--data.batch-size", "2048"]  # less noise per step than the tiny default
    assert (
        train.main(
            ["chess", "lr-find", *tiny_args(prepared, tmp_path, *big_batch)[1:], "--steps", "100", "--lr-max", "10"]
        )
        == 0
    )
    out = capsys.readouterr().out
    suggestion = float(out.split("suggested lr: ")[1].split()[0])
    assert 1e-6 < suggestion < 10
    folder = next(tmp_path.glob("lr-find-*"))
    with open(folder / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 10 and (folder / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "existing").rglob("*")} == before  # untouched
    # A short run at the suggested LR lowers the loss.
    args = [
        *big_batch,
        "--run-name",
        "at-suggestion",
        "--schedule.kind",
        "constant",
        "--optim.lr",
        str(suggestion),
        "--train.max-steps",
        "40",
        "--log.every",
        "5",
        "--train.val-every",
        "40",
    ]
    assert train.main(tiny_args(prepared, tmp_path, *args)) == 0
    curve = train_losses(tmp_path / "at-suggestion")
    assert curve[40] < 0.8 * curve[5]


def test_export_config_round_trip_is_identity(tmp_path, capsys):
    assert train.main(["chess", "export-config", "--optim.lr", "0.004", "--data.batch-size", "1024"]) == 0
    exported = capsys.readouterr().out
    saved = tmp_path / "cfg.json"
    saved.write_text(exported)
    assert train.main(["chess", "export-config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == exported
    cfg = parse_config(["chess", "--config", str(saved)])
    assert cfg.optim.lr == 0.004 and cfg.data.batch_size == 1024
    assert json.loads(exported) == json.loads(tools_export(parse_config(["chess", "--config", str(saved)])))


def tools_export(cfg) -> str:
    from kibitz import tools

    return tools.export_config(cfg)


def test_win_probability_model_trains_evaluates_and_predicts(prepared, tmp_path, capsys):
    assert train.main(tiny_args(prepared, tmp_path, "--run-name", "wp", "--data.target", "win_prob")) == 0
    printed = json.loads((tmp_path / "wp" / "test_metrics.json").read_text())
    ckpt = best_checkpoint(tmp_path / "wp")
    assert train.main(["chess", "evaluate", "--ckpt", str(ckpt)]) == 0
    assert printed_table(capsys.readouterr().out)["l1"] == pytest.approx(printed["test/l1"], abs=1e-4)
    assert predict.main(["--ckpt", str(ckpt), "8/8/8/4k3/8/8/3QK3/8 w - - 0 1"]) == 0
    fen, pawns, win = capsys.readouterr().out.strip().split("\t")
    assert 0 < float(win) < 1
    logit = math.log(float(win) / (1 - float(win)))
    assert float(pawns) == pytest.approx(logit * losses.WIN_PROB_SCALE_CP / 100, abs=1e-2)


def test_predict_refuses_what_prepare_refuses(trained, tmp_path, capsys):
    ckpt = str(best_checkpoint(trained))
    two_white_kings = "4k3/8/8/8/8/8/8/K3K3 w - - 0 1"
    assert predict.main(["--ckpt", ckpt, two_white_kings]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a legal standard-chess position" in err and "\n" not in err
    games = tmp_path / "g.pgn"
    games.write_text(
        '[Event "a"]\n[Variant "Atomic"]\n\n1. e4 e5 *\n\n[Event "c"]\n[Variant "Crazyhouse"]\n\n1. e4 e5 *\n\n'
        '[Event "960"]\n[Variant "Chess960"]\n[FEN "bbqnnrkr/pppppppp/8/8/8/8/PPPPPPPP/BBQNNRKR w HFhf - 0 1"]\n\n'
        '1. e4 *\n\n[Event "ok"]\n\n1. d4 *\n\n'
    )
    assert predict.main(["--ckpt", ckpt, "--pgn", str(games)]) == 0
    captured = capsys.readouterr()
    assert [line.split("\t")[0].split()[0] for line in captured.out.splitlines()] == [
        "rnbqkbnr/pppppppp/8/8/3P4/8/PPP1PPPP/RNBQKBNR"
    ]
    assert "skipped 3 games" in captured.err
    for flags, message in (
        (["--pgn", str(tmp_path / "missing.pgn")], "missing.pgn: no such file"),
        (["--batch-size", "0", two_white_kings], "--batch-size: expected a positive count"),
    ):
        assert predict.main(["--ckpt", ckpt, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_export_checkpoint_refuses_what_is_not_a_folder_of_shards(trained, tmp_path, capsys):
    """(The export of a real sharded folder is tested with the 2-process FSDP2 run in test_checkpoints_resume.py.)"""
    ckpt = trained / "checkpoints" / "last.ckpt"  # a file: one already
    cases = [
        (["--ckpt", str(ckpt), "--out", str(tmp_path / "x.ckpt")], "ckpt: expected a folder of shards"),
        (["--ckpt", str(tmp_path), "--out", str(tmp_path / "x.ckpt")], "ckpt: expected a folder of shards"),
    ]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.pt").write_bytes(b"x")
    (shards / "__0_0.distcp").write_bytes(b"not a shard")
    cases.append((["--ckpt", str(shards), "--out", str(tmp_path / "no" / "x.ckpt")], "out: expected a file name"))
    cases.append((["--ckpt", str(shards), "--out", str(tmp_path / "x.ckpt")], f"error: cannot export {shards}"))
    for args, message in cases:
        assert train.main(["export-checkpoint", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("x.ckpt*"))  # nothing half-written left behind
