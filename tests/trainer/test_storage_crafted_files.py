"""Files made by an attacker, through every command that reads them: folders of shards (a dotted name in the index,
a rank-local index, a value that runs code, an item pointing outside), a data-only checkpoint whose fields are
hostile, names that are paths or terminal escapes, links in a run folder, a planted wandb artifact. Every payload
would touch a marker file; every case must end in one line (or be harmless) with no marker."""

import contextlib
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FEN,
    LONG,
    Plant,
    as_folder,
    child_env,
    one_line,
    parse_config,
    run_python,
    run_script,
    start,
    tiny_args,
    wait_for_steps,
)

import train
from config import ConfigError
from kibitz import storage
from tasks import predict
from tasks.chess import CHESS


def readers(prepared: Path, out: Path, ckpt: str) -> list[list[str]]:
    """Every train.py command that reads a checkpoint given by path."""
    return [
        ["evaluate", "--ckpt", ckpt],
        ["chess", "evaluate", "--ckpt", ckpt],
        tiny_args(prepared, out, "--init-from", ckpt),
        tiny_args(prepared, out, "--resume", ckpt),
        tiny_args(prepared, out, "--run-name", "r", "--resume", ckpt),
        ["export-checkpoint", "--ckpt", ckpt, "--out", str(out / "exported.ckpt")],
    ]


def refused_everywhere(prepared, tmp_path, capsys, ckpt: Path, marker: Path, expected: str) -> None:
    """Each reader, predict.py and `--resume auto` over a run whose last.ckpt is `ckpt`: one line, nothing run."""
    for argv in readers(prepared, tmp_path / "out", str(ckpt)):
        assert train.main(argv) == 2, argv
        line = one_line(capsys)
        assert expected in line, (argv, line)
        assert not marker.exists(), argv
    assert predict.main(["--ckpt", str(ckpt), FEN]) == 2
    assert expected in one_line(capsys) and not marker.exists()
    assert not (tmp_path / "out" / "exported.ckpt").exists()
    name = f"planted-{ckpt.stem}"  # a run whose last.ckpt someone replaced: --resume auto passes over it
    args = tiny_args(prepared, tmp_path / "out", "--run-name", name, "--train.max-steps", "8")
    assert train.main(args) == 0
    last = tmp_path / "out" / name / "checkpoints" / "last.ckpt"
    storage.remove(last)
    if ckpt.is_dir():
        shutil.copytree(ckpt, last, symlinks=True)  # a link stays a link (one to /dev/urandom is never read)
    else:
        shutil.copyfile(ckpt, last)
    capsys.readouterr()
    assert train.main([*args[:-2], "--train.max-steps", "12", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {last}: cannot load checkpoint" in out and expected in out and not marker.exists()
    assert "step-00000008.ckpt at step 8" in out


def shards_of(trained: Path, folder: Path, values: dict | None = None) -> Path:
    """A folder of shards made from the trained run's last checkpoint, with `values` (non-tensor items) beside the
    model, as an optimizer's hyperparameters are stored."""
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    as_folder(state, folder)
    if values is not None:
        import torch.distributed.checkpoint as dcp

        storage.remove(folder / ".metadata")
        for shard in folder.glob("*.distcp"):
            shard.unlink()
        with storage.without_process_group_warning():
            dcp.save({"model": dict(state["model"]), "optimizer": values}, checkpoint_id=folder)
    return folder


def index_of(folder: Path):
    return storage.dcp_metadata(folder)


def short_string(text: bytes) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text  # SHORT_BINUNICODE


def dotted(marker: Path, rest: bytes) -> bytes:
    """A pickle that calls `torch.distributed.checkpoint.metadata.os.system(...)` (STACK_GLOBAL with a dotted name:
    the module imports os), then goes on to the real index."""
    call = (
        short_string(b"torch.distributed.checkpoint.metadata")
        + short_string(b"os.system")
        + b"\x93"  # STACK_GLOBAL
        + short_string(f"touch {marker}".encode())
        + b"\x85R0"  # TUPLE1, REDUCE, POP
    )
    return b"\x80\x04" + call + rest[2:]


def test_a_dotted_name_in_the_index_runs_nothing(prepared, trained, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    folder = shards_of(trained, tmp_path / "dotted.ckpt")
    (folder / ".metadata").write_bytes(dotted(marker, pickle.dumps(index_of(folder), protocol=2)))
    pickle.loads((folder / ".metadata").read_bytes())  # the plant is live: torch's own reader would run it
    assert marker.exists()
    marker.unlink()
    refused_everywhere(prepared, tmp_path, capsys, folder, marker, "names torch.distributed.checkpoint.metadata.os")


def test_a_rank_local_index_and_a_linked_index_are_refused(prepared, trained, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    folder = shards_of(trained, tmp_path / "local.ckpt")
    (folder / ".metadata").rename(folder / "__0.metadata")
    real = (folder / "__0.metadata").read_bytes()
    (folder / "__0.metadata").write_bytes(dotted(marker, real))  # torch falls back to it without .metadata
    refused_everywhere(prepared, tmp_path, capsys, folder, marker, "__0.metadata is a rank-local index")
    linked = shards_of(trained, tmp_path / "linked.ckpt")
    (linked / ".metadata").unlink()
    (linked / ".metadata").symlink_to("/dev/urandom")
    refused_everywhere(prepared, tmp_path, capsys, linked, marker, ".metadata is a link")


def test_a_value_that_runs_code_in_a_shard_is_refused(prepared, trained, tmp_path, capsys):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.metadata import MetadataIndex

    marker = tmp_path / "code-ran"
    folder = shards_of(trained, tmp_path / "bytes.ckpt", {"param_groups": [{"lr": 0.1}]})
    shard = next(folder.glob("*.distcp"))
    payload = tmp_path / "payload.pt"
    torch.save([Plant(marker)], payload)
    index = index_of(folder)
    index.storage_data[MetadataIndex("optimizer.param_groups.0.lr")] = _StorageInfo(
        shard.name, shard.stat().st_size, payload.stat().st_size
    )
    with open(shard, "ab") as f:
        f.write(payload.read_bytes())
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    with storage.without_process_group_warning(), contextlib.suppress(TypeError):  # the file it opened: no tensor
        dcp_to_torch_save(folder, tmp_path / "torch-converted.pt")  # torch's own reading runs it
    assert marker.exists()
    marker.unlink()
    refused_everywhere(prepared, tmp_path, capsys, folder, marker, "optimizer.param_groups.0.lr in __0_0.distcp holds")


def test_an_item_pointing_outside_its_folder_is_refused(prepared, trained, tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    folder = shards_of(trained, tmp_path / "outside.ckpt")
    index = index_of(folder)
    for place in index.storage_data.values():
        place.relative_path = "../secret.bin"
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    refused_everywhere(prepared, tmp_path, capsys, folder, tmp_path / "no-marker", "which is not a shard file")


def test_a_folder_without_its_metadata_or_meta_pt_names_the_missing_file(prepared, trained, tmp_path, capsys):
    folder = shards_of(trained, tmp_path / "no-meta.ckpt")
    (folder / ".metadata").unlink()
    refused_everywhere(prepared, tmp_path, capsys, folder, tmp_path / "no-marker", "no .metadata")
    folder = shards_of(trained, tmp_path / "weights-only.ckpt")
    (folder / "meta.pt").unlink()  # weights alone: --init-from takes them; what needs the run's state says so
    for argv in [*readers(prepared, tmp_path / "out", str(folder))[:2], ["export-checkpoint", "--ckpt", str(folder)]]:
        assert train.main([*argv, "--out", str(tmp_path / "one.ckpt")] if "export" in argv[0] else argv) == 2
        assert "meta.pt" in one_line(capsys), argv
    assert train.main(tiny_args(prepared, tmp_path / "out", "--resume", str(folder))) == 2
    assert "no meta.pt (the run's config and progress)" in one_line(capsys)
    assert train.main(tiny_args(prepared, tmp_path / "out", "--run-name", "w", "--init-from", str(folder))) == 0


def state_of(trained: Path) -> dict:
    return torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)


def test_a_best_list_naming_paths_deletes_nothing(prepared, trained, tmp_path, capsys):
    victim = tmp_path / "victimdir"
    (victim / "inner").mkdir(parents=True)
    state = state_of(trained)
    args = tiny_args(prepared, tmp_path / "out", "--run-name", "b", "--checkpoint.keep-best", "1")
    for hostile in (str(victim), "../../victimdir", "step-1.ckpt/../../x"):
        state["progress"]["best"] = [(0.0, hostile), (0.1, hostile)]
        torch.save(state, tmp_path / "hostile.ckpt")
        assert train.main([*args, "--train.max-steps", "16", "--resume", str(tmp_path / "hostile.ckpt")]) == 2
        assert "progress.best: expected [score, 'step-N.ckpt'] pairs" in one_line(capsys)
        assert (victim / "inner").is_dir()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("progress.extra", 1, "progress.extra: expected no such field (the loop's are step, epoch, ...)"),
        ("progress.step", "8", "progress.step: expected a count"),
        ("rng", None, "rng: expected a list of every rank's RNG states"),
        ("rng", [], "rng: expected a list of every rank's RNG states"),
        ("data", [{"position": 3}], "data: expected none: this task's training data is no stream"),
        ("window.sums", [0.0, 0.0], "window.sums: expected a tensor of shape"),
    ],
)
def test_a_malformed_field_of_a_checkpoint_is_one_line(prepared, trained, tmp_path, capsys, field, value, expected):
    state = state_of(trained)
    top, _, key = field.partition(".")
    if key:
        state[top][key] = value
    else:
        state[top] = value
    torch.save(state, tmp_path / "malformed.ckpt")
    argv = tiny_args(
        prepared, tmp_path / "out", "--train.max-steps", "16", "--resume", str(tmp_path / "malformed.ckpt")
    )
    assert train.main(argv) == 2
    line = one_line(capsys)
    assert "cannot load checkpoint" in line and expected in line, line


def test_damaged_or_hostile_files_are_one_line_in_evaluate_and_predict(trained, tmp_path, capsys):
    import zipfile

    last = trained / "checkpoints" / "last.ckpt"
    flipped = bytearray(last.read_bytes())
    with zipfile.ZipFile(last) as archive:  # bits flipped inside the weights, the zip's frame intact
        weights = max(archive.infolist(), key=lambda info: info.file_size)
        start = weights.header_offset + 30 + len(weights.filename) + len(weights.extra)
    for i in range(1000):
        flipped[start + 8 + i] ^= 0x10
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with zipfile.ZipFile(tmp_path / "foreign.ckpt", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    state = state_of(trained)
    state["config"]["model"]["width"] = 10**9  # a hostile size: never allocated
    torch.save(state, tmp_path / "huge.ckpt")
    state["config"] = "a string"
    torch.save(state, tmp_path / "string-config.ckpt")
    cases = {
        "flipped.ckpt": "does not match its CRC-32",
        "foreign.ckpt": "not one torch.save wrote",
        "huge.ckpt": "its config builds a model whose",
        "string-config.ckpt": "cannot be loaded as a kibitz checkpoint",
    }
    for name, expected in cases.items():
        ckpt = str(tmp_path / name)
        assert train.main(["evaluate", "--ckpt", ckpt]) == 2, name
        assert expected in one_line(capsys), name
        assert predict.main(["--ckpt", ckpt, FEN]) == 2, name
        line = one_line(capsys)
        assert "cannot" in line or "not" in line or "its config" in line, (name, line)


def test_names_from_files_and_flags_are_plain_and_printable(prepared, trained, tmp_path, capsys):
    out = tmp_path / "out"
    for name in ("a\nb", "-rf", "x\x1b[31mFAKE"):
        assert train.main(tiny_args(prepared, out, f"--run-name={name}")) == 2
        assert one_line(capsys).startswith("error: run_name: expected one plain folder name")
    state = state_of(trained)
    state["run"]["name"] = "x\n\x1b[31mFAKE"
    torch.save(state, tmp_path / "escape.ckpt")
    assert train.main(tiny_args(prepared, out, "--resume", str(tmp_path / "escape.ckpt"))) == 2
    assert "records the run name 'x\\n\\x1b[31mFAKE'" in one_line(capsys)
    state = state_of(trained)
    state["config"]["task"], state["task"] = "mine", {"name": "mine", "file": "t.py\nerror: all good, run: rm -rf ~"}
    torch.save(state, tmp_path / "forged.ckpt")
    assert train.main(["evaluate", "--ckpt", str(tmp_path / "forged.ckpt")]) == 2
    line = one_line(capsys)  # the forged line is not printed: the file is not shown at all
    assert "if you trust the task file" in line and "rm -rf" not in line
    assert not list(out.glob("*")) or all(p.name.isprintable() for p in out.iterdir())


def test_a_run_name_used_again_without_resume_is_refused(prepared, tmp_path, capsys):
    args = tiny_args(prepared, tmp_path, "--run-name", "once", "--train.max-steps", "8")
    assert train.main(args) == 0
    before = (tmp_path / "once" / "metrics.csv").read_text()
    capsys.readouterr()
    assert train.main(args) == 2
    line = one_line(capsys)
    assert f"run_name: {tmp_path / 'once'} holds a run at step 8; add --resume auto" in line, line
    assert (tmp_path / "once" / "metrics.csv").read_text() == before
    with pytest.raises(ConfigError, match="holds a run at step 8; add --resume auto"):  # from Python, the same
        train.train(parse_config(args), CHESS)
    assert (tmp_path / "once" / "metrics.csv").read_text() == before
    assert train.main([*args[:-2], "--train.max-steps", "12", "--resume", "auto"]) == 0


def test_links_in_a_run_folder_are_never_followed(prepared, tmp_path, capsys):
    args = tiny_args(prepared, tmp_path / "out", "--run-name", "copied", "--train.max-steps", "8")
    assert train.main(args) == 0
    run_dir = tmp_path / "out" / "copied"
    for name in (".lock", "test_metrics.json", "checkpoints/step-00000004.ckpt"):
        target = tmp_path / f"target-{Path(name).name}"
        target.write_text("precious")
        storage.remove(run_dir / name)
        (run_dir / name).symlink_to(target)
        capsys.readouterr()
        assert train.main([*args[:-2], "--train.max-steps", "12", "--resume", "auto"]) == 2
        assert "is a link; kibitz never follows links in a run folder" in one_line(capsys)
        assert target.read_text() == "precious"
        (run_dir / name).unlink()
    storage.write_atomic(run_dir / "config.json.tmp", "")  # a leftover name is replaced, never written through
    (run_dir / ".config.json.tmp").symlink_to(tmp_path / "target-.lock")
    storage.write_atomic(run_dir / "wandb_id.txt", "abc")
    assert (tmp_path / "target-.lock").read_text() == "precious"


def test_a_planted_wandb_artifact_writes_nothing_outside(prepared, trained, tmp_path, capsys):
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    staged = out / "shared" / "wandb" / "data"
    staged.mkdir(parents=True)
    (staged / "evil").write_text("attacker's bytes")
    (staged / "model.ckpt").write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    plant = f"""
import os, wandb
from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry
run = wandb.init(mode="offline", dir={str(out / "shared")!r}, project="p")
artifact = wandb.Artifact("model-shared", type="model")
artifact.add_file({str(staged / "model.ckpt")!r}, name="model.ckpt")
entry = artifact.manifest.entries["model.ckpt"]
for path in ("../../../victim.txt", {str(victim)!r}):  # wandb refuses these names; written into its record anyway
    artifact.manifest.entries[path] = ArtifactManifestEntry(
        path=path, digest=entry.digest, local_path={str(staged / "evil")!r}, size=entry.size
    )
run.log_artifact(artifact, aliases=["latest"])
run.finish()
"""
    made = run_python([sys.executable, "-c", plant], env=child_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    commands = [
        tiny_args(prepared, out, "--resume", "wandb:model-shared"),
        tiny_args(prepared, out, "--run-name", "i", "--init-from", "wandb:model-shared"),
        ["evaluate", "--ckpt", "wandb:model-shared", "--out-dir", str(out)],
    ]
    for argv in commands:
        assert train.main(argv) == 2, argv
        assert "the artifact names the entry" in one_line(capsys), argv
        assert victim.read_text() == "original"
    assert not (tmp_path / "victim.txt.tmp").exists() and not list(out.glob("artifacts/*/model.ckpt"))


def test_convert_trust_writes_a_new_folder_not_the_old_files(prepared, trained, tmp_path, capsys):
    folder = shards_of(trained, tmp_path / "old.ckpt", {"param_groups": [{"lr": 0.1}]})
    (folder / "extra.bin").write_bytes(b"left behind")
    out = tmp_path / "new.ckpt"
    assert train.main(["convert-checkpoint", "--ckpt", str(folder), "--out", str(out), "--trust"]) == 0
    assert not (out / "extra.bin").exists()
    old_inodes = {p.stat().st_ino for p in folder.iterdir()}
    assert all(p.stat().st_ino not in old_inodes for p in out.iterdir())
    storage.verify(out)
    assert train.main(["evaluate", "--ckpt", str(out)]) == 0


@pytest.mark.slow
def test_kill_9_with_dataloader_workers_then_resume_auto_at_once(prepared, tmp_path):
    process = start(prepared, tmp_path, "workers", "--data.num-workers", "2")
    wait_for_steps(tmp_path / "workers", 20, process)
    process.kill()  # SIGKILL to the run alone: its DataLoader workers live on for a moment
    process.wait(timeout=60)
    started = time.time()
    resumed = run_script(
        ["train.py", *tiny_args(prepared, tmp_path, *LONG, "--run-name", "workers")]
        + ["--data.num-workers", "2", "--resume", "auto"]
    )
    output = process.communicate(timeout=60)[0]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the first run is left
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and time.time() - started < 120
    assert "Traceback" not in resumed.stderr + output
