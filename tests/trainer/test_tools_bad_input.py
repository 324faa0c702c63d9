"""Issue 26's remaining bad inputs: each one line that says what to do, never a traceback or a silent exit 0."""

from pathlib import Path

import pytest
from conftest import tiny_args

import train
from chessdata.cli import main as chessdata_main
from tasks import predict


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert train.main(tiny_args(prepared, out, "--run-name", "t", "--train.max-steps", "4")) == 0
    return out / "t"


def test_bad_config_files_are_one_line(trained, tmp_path, capsys):
    binary, nested = tmp_path / "binary.json", tmp_path / "nested.json"
    binary.write_bytes(bytes(range(256)))
    nested.write_text("[" * 100_000 + "]" * 100_000)
    config = str(trained / "config.json")
    cases = [
        (["--config", str(binary)], "cannot read a JSON config"),
        (["--config", str(nested)], "nested too deeply"),
        (["dvae", "--config", config], "a config of the 'chess' task, expected 'dvae'"),
        (["--config", config, "--config", config], "--config: given twice"),
    ]
    for argv, expected in cases:
        assert train.main([*argv, "--out-dir", str(tmp_path)]) == 2, argv
        assert expected in one_line(capsys), argv
    assert train.main([f"--config={config}", "--out-dir", str(tmp_path), "--train.max-steps", "2"]) == 0


def test_bad_predict_inputs_are_one_line(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    binary = tmp_path / "binary"
    binary.write_bytes(bytes(range(256)) * 8)
    assert predict.main(["--ckpt", ckpt, "--fens", str(binary)]) == 2
    assert "expected a text file of FENs" in one_line(capsys)
    assert predict.main(["--ckpt", ckpt, "--pgn", str(binary)]) == 2
    assert "not a PGN of legal games" in one_line(capsys)
    null_moves = tmp_path / "null.pgn"
    null_moves.write_text('[Event "x"]\n\n1. e4 -- 2. d4 *\n')
    assert predict.main(["--ckpt", ckpt, "--pgn", str(null_moves)]) == 2
    assert "a null move" in one_line(capsys)


def test_bad_tool_arguments_are_one_line(prepared, trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    for size in ("-5", "0"):
        assert train.main(["evaluate", "--ckpt", ckpt, "--batch-size", size]) == 2
        assert "batch_size: expected a positive count" in one_line(capsys)
    for flags, expected in [
        (["--smoothing", "1.0"], "smoothing: expected a value in [0, 1)"),
        (["--smoothing", "1.5"], "smoothing: expected a value in [0, 1)"),
        (["--diverge", "-1"], "diverge: expected a multiple of the minimum loss above 1"),
    ]:
        assert train.main(["chess", "lr-find", *tiny_args(prepared, tmp_path)[1:], *flags]) == 2
        assert expected in one_line(capsys)
    with pytest.raises(SystemExit) as exit:
        chessdata_main(["dump", str(prepared), "--limit", "-1"])
    assert exit.value.code == 2 and "--limit: expected a count >= 0" in one_line(capsys)


def test_missing_truncated_and_foreign_checkpoints_say_which(trained, tmp_path, capsys):
    truncated, foreign = tmp_path / "truncated.ckpt", tmp_path / "foreign.ckpt"
    truncated.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    foreign.write_text("not a checkpoint")
    messages = set()
    for path in (tmp_path / "missing.ckpt", truncated, foreign):
        assert train.main(["evaluate", "--ckpt", str(path)]) == 2
        messages.add(one_line(capsys).replace(str(path), "PATH"))
    assert len(messages) == 3 and any("no such checkpoint file or folder" in m for m in messages)


def test_resuming_with_another_width_or_task_says_why(prepared, trained, capsys):
    out = trained.parent
    assert train.main(tiny_args(prepared, out, "--run-name", "t", "--model.width", "48", "--resume", "auto")) == 2
    line = one_line(capsys)  # a change of what the run trains on is refused before the checkpoint is read
    assert line.startswith("error: resume: --model.width changes what the run in") and "--config" in line
    config = ["--config", str(trained / "config.json")]  # said to be meant: the checkpoint itself then disagrees
    resumed = tiny_args(prepared, out, *config, "--run-name", "t", "--model.width", "48", "--resume", "auto")
    assert train.main(resumed) == 2
    captured = capsys.readouterr()
    assert "size mismatch" in captured.out and "Traceback" not in captured.err
    assert all(len(line) < 1200 for line in captured.out.splitlines())  # torch's many lines, made one
    assert (
        train.main(["dvae", "--data.dir", str(prepared), "--out-dir", str(out), "--run-name", "t", "--resume", "auto"])
        == 2
    )
    assert f"resume: {trained} is a run of the 'chess' task, not of 'dvae'" in one_line(capsys)


def test_dvae_resume_auto_passes_over_other_tasks_runs(prepared, trained, capsys):
    from kibitz.runs import newest_run

    assert newest_run(trained.parent, "chess") == trained and newest_run(trained.parent, "dvae") is None


def test_charlm_on_a_text_too_short_is_one_line(tmp_path, capsys):
    import train

    for text in ("", "abc" * 20):
        (tmp_path / "short.txt").write_text(text)
        args = ["examples/charlm.py", "--data.file", str(tmp_path / "short.txt"), "--out-dir", str(tmp_path)]
        assert train.main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err[-2000:]
        assert "data.file: expected a text of at least 1300 bytes for a context of 64" in err
