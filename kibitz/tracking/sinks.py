"""The sinks a run logs to, on rank 0: metrics.csv (always: long format step,name,value, flushed on every write so
a crash loses nothing), and beside it wandb (offline by default: the run folder is one `wandb sync` uploads; a
resumed run continues the same wandb run) or TensorBoard (scalars, histograms, images, HParams). Each has
`log(metrics, step)`, `summary(metrics)` and `finish()`; loggers.py fans out to them."""

import contextlib
import csv
import io
import json
import os
import re
import secrets
import stat
from pathlib import Path

# kibitz.storage (and with it torch) is imported where it is used: reading a metrics.csv (metric_rows) stays light for
# the sweep's trials, which poll their runs' files from Ray's workers, where importing torch took seconds.


class CSVLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        from kibitz.storage import open_in_place, write_atomic

        if resume_step is not None and path.exists():  # rows past the checkpoint will be logged again
            rows = [row for row in metric_rows(path) if int(row[0]) <= resume_step]
            text = io.StringIO()
            csv.writer(text).writerows([["step", "name", "value"], *rows])
            write_atomic(path, text.getvalue())
        new = not path.exists()
        self.file = open_in_place(path, "a")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "name", "value"])

    def log(self, metrics: dict, step: int) -> None:
        self.writer.writerows([step, name, value] for name, value in metrics.items())
        self.file.flush()

    def log_histograms(self, histograms: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def log_image(self, name: str, path: Path, step: int) -> None:
        pass  # the picture is in the run folder already

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], dropped: list[str]) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        self.file.close()


def csv_rows(path: Path, first: int, last: int):
    """(step, {name: value}) for the steps first..last of a metrics.csv, in step order."""
    steps: dict[int, dict] = {}
    if first <= last and path.exists():
        for step, name, value in metric_rows(path):
            if first <= int(step) <= last:
                steps.setdefault(int(step), {})[name] = float(value)
    return sorted(steps.items())


def metric_rows(path: Path) -> list[list[str]]:
    """The well-formed [step, name, value] rows of a metrics.csv, as written. A crash or a power loss can leave a
    torn last line, a blank line or a tail of NUL bytes: those are not rows. A link, a device or a folder has none."""
    rows = []
    try:  # a link is not followed; O_NONBLOCK: a FIFO does not hold the open
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing, or a link
        return rows
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a device (/dev/full, say) would be read forever
        os.close(descriptor)
        return rows
    with open(descriptor, newline="", errors="replace") as f:
        for row in csv.reader(line.replace("\0", "") for line in f):
            try:
                if len(row) == 3 and int(row[0]) >= 0 and float(row[2]) is not None:  # a NaN loss is a row too
                    rows.append(row)
            except ValueError:  # the header, or a torn line
                continue
    return rows


class WandbLog:
    """An offline (or online) wandb run inside the run folder. The run id is kept in the run folder,
    so a resumed run continues the same wandb run, every step in it once:

    A killed process leaves its wandb segment cut at some step k (wandb writes in blocks; whatever was
    not written is lost), while the checkpoint it resumes from is at step c. The resumed segment
    first replays the scalars of steps k+1..c from metrics.csv (flushed on every write), then logs
    only steps past k: steps c+1..k are already in the earlier segment, with the same values, since
    the resume is exact. `wandb sync` uploads the segments in order into the one run."""

    def __init__(
        self,
        run_dir: Path,
        project: str,
        mode: str,
        config: dict,
        resume_step: int | None = None,
        summaries: dict[str, str] | None = None,
    ):
        import wandb  # slow to import: only when used

        from kibitz.storage import write_atomic

        id_file = run_dir / "wandb_id.txt"
        # secrets, not random: drawing from the training RNG here would change the run.
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        write_atomic(id_file, run_id)
        self.recorded = last_recorded_step(run_dir / "wandb", run_id) if resume_step is not None else -1
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            dir=run_dir,
            mode=mode,
            config=config,
            resume="allow",
            settings=wandb.Settings(
                silent=os.environ.get("WANDB_SILENT", "true").lower() == "true"
            ),  # quiet by default
        )
        summaries = summaries or {}
        if self.run.resumed:  # online: the server knows the run's last step too
            self.recorded = max(self.recorded, self.run.starting_step - 1)
        if resume_step is not None:
            for step, metrics in csv_rows(run_dir / "metrics.csv", self.recorded + 1, resume_step):
                self.run.log(metrics, step=step)
            if self.recorded > resume_step:  # say so: from an older checkpoint with changed flags they would differ
                print(
                    f"wandb: run {run_id} already holds steps {resume_step + 1}..{self.recorded}; they are not "
                    "logged again (a resumed run repeats them exactly; use a new --run-name to branch)",
                    flush=True,
                )
            self.recorded = max(self.recorded, resume_step)
        for name, direction in summaries.items():  # the task's metrics: summarised by their best value
            self.run.define_metric(name, summary=direction)
        self.wandb = wandb
        self.staging = run_dir / "wandb" / "data"

    def log(self, metrics: dict, step: int) -> None:
        if step > self.recorded:
            self.run.log(metrics, step=step)

    def log_histograms(self, histograms: dict, step: int) -> None:
        if step <= self.recorded:
            return
        self.run.log(
            {
                name: self.wandb.Histogram(np_histogram=(counts, edges))
                for name, (counts, edges, _, _) in histograms.items()
            },
            step=step,
        )

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if step <= self.recorded:
            return
        rows = [[self.wandb.Html(v) if isinstance(v, str) and v.startswith("<svg") else v for v in row] for row in rows]
        with staging_in(self.staging):  # a logged table is an artifact too
            self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        if step <= self.recorded:
            return
        with staging_in(self.staging):
            self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], dropped: list[str]) -> None:
        """The checkpoint as a version of the run's model artifact. Versions of checkpoints that the
        local keep-k deleted lose their aliases and, online, are deleted (offline there is nothing
        to delete until `wandb sync`)."""
        artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"file": name})
        with staging_in(self.staging):  # wandb copies the checkpoint there until `wandb sync` uploads it
            if path.is_dir():  # a sharded checkpoint: its folder
                artifact.add_dir(str(path), name="model.ckpt")
            else:
                artifact.add_file(str(path), name="model.ckpt")
            self.run.log_artifact(artifact, aliases=aliases)
        if dropped and self.run.settings.mode == "online":
            try:
                api = self.wandb.Api()
                for version in api.artifacts("model", f"{self.run.entity}/{self.run.project}/model-{self.run.id}"):
                    if version.metadata.get("file") in dropped:
                        version.delete(delete_aliases=True)
            except Exception as exc:  # a tracker problem must not stop training
                print(f"warning: wandb: could not delete dropped checkpoint artifacts ({exc})")

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=1 if status == "FAILED" else None)  # a stopped run resumes: not a crash


@contextlib.contextmanager
def staging_in(folder: Path):
    """wandb stages a logged artifact's files under its data folder (~/.local/share/wandb unless WANDB_DATA_DIR
    says otherwise) until they are uploaded: in the run folder instead, they travel with the run when it is
    copied, and a cluster's home quota does not fill with checkpoint copies. The caller's environment is
    restored."""
    before = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = before


def wandb_records(log: Path) -> list[dict]:
    """The records of a run's .wandb file, in order, each as {"type": KIND, KIND: its fields} (a history row's items
    as {name: value}), read in this process; they end where a killed run's file was cut short. A file that is not a
    wandb log, or a link, is one line (ConfigError)."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2

    from config import ConfigError
    from kibitz.storage import read_no_follow

    try:
        data = read_no_follow(log)
    except OSError as exc:
        raise ConfigError(f"{log}: cannot read this wandb log ({exc.strerror}; links are not followed)") from None
    if not data.startswith(WANDB_LOG_HEADER):
        raise ConfigError(f"{log}: not a wandb log (it does not start with wandb's header)")
    records = []
    for payload in log_payloads(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # a damaged record: nothing after it can be trusted
            break
        kind = record.WhichOneof("record_type")
        fields = MessageToDict(getattr(record, kind), preserving_proto_field_name=True) if kind else {}
        if kind == "history":
            fields = {"step": {"num": record.history.step.num}, "item": history_items(record.history)}
        records.append({"type": kind, kind: fields})
    return records


# wandb's transaction log is LevelDB's log format: blocks of 32 KiB holding records, each with a header of CRC-32
# (of its kind and bytes), length and kind (whole, or the first, a middle or the last piece of one split over
# blocks), the file's first block starting with wandb's own 7-byte header (":W&B", 0xBEE1, version 0).
WANDB_LOG_HEADER = b":W&B\xe1\xbe\x00"
LOG_BLOCK = 32 * 1024
WHOLE, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def log_payloads(data: bytes):
    """The records' bytes, in order, up to the first piece that is cut short, zeroed or fails its checksum."""
    import struct
    import zlib

    position, pieces = len(WANDB_LOG_HEADER), []
    while position + 7 <= len(data):
        room = LOG_BLOCK - position % LOG_BLOCK
        if room < 7:  # a block's last bytes, too few for a header, are padding
            position += room
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, position)
        payload = data[position + 7 : position + 7 + length]
        if kind not in (WHOLE, FIRST, MIDDLE, LAST) or len(payload) < length or length > room - 7:
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            return
        position += 7 + length
        pieces = [payload] if kind in (WHOLE, FIRST) else [*pieces, payload]
        if kind in (WHOLE, LAST):
            yield b"".join(pieces)
            pieces = []


def history_items(history) -> dict:
    """A history row's items as {name: value}; a value that is not JSON (a damaged row) as its text."""
    items = {}
    for item in history.item:
        name = item.key or "/".join(item.nested_key)
        try:
            items[name] = json.loads(item.value_json)
        except ValueError:
            items[name] = item.value_json
    return items


def wandb_segments(wandb_dirs: list[Path], run_id: str | None = None) -> list[Path]:
    """The .wandb files of every start (segment) of wandb run `run_id` (default: of all runs), oldest
    first. wandb names a segment's folder `[offline-]run-<start second>-<id>`, adding -1, -2, ... when
    two start in the same second; a segment killed before it wrote anything has no file."""
    segments = []
    for log in (log for d in wandb_dirs for log in d.glob("*/run-*.wandb")):
        match = re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-(\w+?)(?:-(\d+))?", log.parent.name)
        if match and run_id in (None, match[2]):
            segments.append((match[1], int(match[3] or 0), log))
    return [log for *_, log in sorted(segments)]


def last_recorded_step(wandb_dir: Path, run_id: str) -> int:
    """The last step that the earlier segments of wandb run `run_id` hold (-1: none)."""
    steps = [
        r["history"].get("step", {}).get("num", 0)  # the step is left out of the JSON when it is 0
        for log in wandb_segments([wandb_dir], run_id)
        for r in wandb_records(log)
        if r["type"] == "history"
    ]
    return max(steps, default=-1)


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}; values TensorBoard's HParams cannot hold (None, lists,
    paths) as their text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class TensorBoardLog:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        self.hparams = flat_hparams(config)
        self.step = 0

    def log(self, metrics: dict, step: int) -> None:
        self.step = max(self.step, step)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_histograms(self, histograms: dict, step: int) -> None:
        for name, (counts, edges, mean, std) in histograms.items():
            n = float(counts.sum())  # the raw call: no re-binning of the data on the host
            self.writer.add_histogram_raw(
                name,
                min=float(edges[0]),
                max=float(edges[-1]),
                num=n,
                sum=mean * n,
                sum_squares=(std**2 + mean**2) * n,
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        keep = [i for i, c in enumerate(columns) if c != "board"]  # markdown: no pictures
        lines = ["| " + " | ".join(columns[i] for i in keep) + " |", "|" + " --- |" * len(keep)]
        lines += [
            "| " + " | ".join(f"{row[i]:.2f}" if isinstance(row[i], float) else str(row[i]) for i in keep) + " |"
            for row in rows
        ]
        self.writer.add_text(name, "\n".join(lines), step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        import matplotlib.image

        pixels = matplotlib.image.imread(path)[..., :3]  # RGBA floats in [0, 1]
        self.writer.add_image(name, (pixels * 255).round().astype("uint8"), step, dataformats="HWC")

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], dropped: list[str]) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        """The test metrics as text, and in the HParams tab against the flattened config (one row a run)."""
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("test", "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        writer = self.writer._get_file_writer()  # add_hparams would open a second run folder for them
        for part in hparams(self.hparams, values):
            writer.add_summary(part)
        for name, value in values.items():  # the HParams tab reads each metric from its scalar series
            self.writer.add_scalar(name, value, self.step)

    def finish(self, status: str = "FINISHED") -> None:
        self.writer.close()
