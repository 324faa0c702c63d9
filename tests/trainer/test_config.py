"""Config values that cannot work, from the command line or a JSON config: one line naming the field."""

import json

import pytest
from conftest import tiny_args

import train


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--optim.lr", "inf"], "optim.lr"),
        (["--optim.lr", "1e39"], "optim.lr: expected a positive number at most 1e30"),
        (["--optim.lr", "nan"], "optim.lr"),
        (["--optim.weight-decay", "inf"], "optim.weight_decay"),
        (["--optim.eps", "inf"], "optim.eps"),
        (["--schedule.noam-scale", "inf"], "schedule.noam_scale"),
        (["--data.clamp", "inf"], "data.clamp"),
        (["--schedule.min-lr-ratio", "nan"], "schedule.min_lr_ratio"),
        (["--schedule.total-steps", "0"], "schedule.total_steps"),
        (["--schedule.noam-d-model", "-1"], "schedule.noam_d_model"),
        (["--train.seed", "-1"], "train.seed"),
    ],
)
def test_non_finite_and_out_of_range_values_are_one_line(prepared, tmp_path, capsys, flags, field):
    assert train.main(tiny_args(prepared, tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {field}"), err


def test_a_nan_in_a_task_section_is_caught_too(tmp_path, capsys):
    assert train.main(["dvae", "--dvae.tc-weight", "nan", "--train.max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: dvae.tc_weight") and "finite" in err, err


@pytest.mark.parametrize(
    "content, message",
    [
        ({"optim": {"lr": "0.001"}}, "optim.lr: expected a number, got '0.001'"),
        ({"optim": 3}, "optim: expected a section"),
        ({"data": {"batch_size": True}}, "data.batch_size: expected an integer, got True"),
        ({"log": {"logger": "neptune"}}, "log.logger: expected"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_a_json_config_with_wrong_types_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    assert train.main(["chess", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
