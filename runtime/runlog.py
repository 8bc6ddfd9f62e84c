"""What a run reports as it goes: progress lines on stderr and the CSV run log.

    rows = read_log("runs/seed/log.csv")     # one dict per step, numbers as written
    rows[-1]["loss"], rows[-1]["val_loss"]

log.csv has one row per completed step (`LOG_COLUMNS`), floats written as
repr so they read back bit for bit. Rows are only appended, one whole row
at a time (`append_row`), and the file is otherwise rewritten atomically by
the run folder, so a killed run leaves at most half a row at the end, which
`read_log(..., tolerant=True)` drops.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time

LOG_NAME = "log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "val_loss", "seconds")


# Notes are printed by one process of a distributed run only (rank 0): the others
# see the same settings and data and would repeat every note (set_quiet).
_NOTES = {"quiet": False}


def set_quiet(quiet: bool) -> bool:
    """Silence (or restore) `note`; returns the previous setting."""
    was = _NOTES["quiet"]
    _NOTES["quiet"] = bool(quiet)
    return was


def note(message: str) -> None:
    """A remark on stderr, printed at once: `note: <message>` (not when set_quiet)."""
    if not _NOTES["quiet"]:
        print(f"note: {message}", file=sys.stderr, flush=True)


def steps_label(first: int, last: int, count: int | None = None) -> str:
    """Which steps a reported loss covers: "step 7", "mean of steps 3-12".

    `count` is how many steps were averaged, when the range may have gaps.
    The progress lines and the summary line say it in these same words.
    """
    if first == last:
        return f"step {first}"
    if count is not None and count != last - first + 1:
        return f"mean of {count} logged steps from {first} to {last}"
    return f"mean of steps {first}-{last}"


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line bar on a terminal, plain lines every ~10% of the steps otherwise.

    On a terminal the bar is redrawn at most ten times a second, and every
    10% it leaves a permanent line behind, so the falling loss stays on
    screen. The loss in a permanent line is the mean over the steps since the
    previous one, and the line says which ("loss 0.6183 (mean of steps 23-24)");
    "val" is the latest validation loss, with the step it was measured at.
    """

    def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True,
                 tty: bool | None = None):
        self.total = max(int(total), 1)
        self.start = int(start)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty",
                                                            lambda: False)())
        self.every = max(1, self.total // 10)
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.window: list[float] = []
        self.window_first = 0  # the step of window[0]
        self.val: float | None = None
        self.val_step: int | None = None
        self.bar_shown = False

    def _rate(self, step: int) -> tuple[float, float]:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        return rate, eta

    def update(self, step: int, loss: float, lr: float, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        if not self.window:
            self.window_first = step
        self.window.append(loss)
        if val_loss is not None:
            self.val, self.val_step = val_loss, step
        rate, eta = self._rate(step)
        if step % self.every == 0 or step == self.total or step == self.start + 1:
            mean = sum(self.window) / len(self.window)
            covered = steps_label(self.window_first, step, len(self.window))
            self.window = []
            val = (f"  val {self.val:.4f} (step {self.val_step})" if self.val is not None
                   else "")
            self.line(f"step {step:>{len(str(self.total))}}/{self.total}  loss {mean:.4f} "
                      f"({covered}){val}  lr {lr:.3g}  {rate:.1f} steps/s  "
                      f"eta {_duration(eta)}")
        elif self.tty and time.perf_counter() - self.last_draw > 0.1:
            self.last_draw = time.perf_counter()
            width = 24
            filled = int(width * step / self.total)
            bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
            text = (f"[{bar}] {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  "
                    f"eta {_duration(eta)}")
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self.bar_shown = True

    def line(self, text: str) -> None:
        """A permanent line (clearing the bar first on a terminal)."""
        if not self.enabled:
            return
        prefix = "\r\x1b[K" if self.tty and self.bar_shown else ""
        self.bar_shown = False
        self.stream.write(prefix + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.bar_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.bar_shown = False


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------


def format_row(row: dict) -> list[str]:
    """A log row as CSV text; floats as repr so they read back bit for bit."""
    val = row.get("val_loss")
    return [str(row["step"]), str(row["epoch"]), repr(float(row["loss"])),
            repr(float(row["lr"])), repr(float(row["grad_norm"])),
            "" if val is None else repr(float(val)), f"{row['seconds']:.3f}"]


def read_log(path: str | os.PathLike, tolerant: bool = False) -> list[dict]:
    """The rows of a log.csv as dicts with numbers (val_loss None where blank).

    A malformed row raises ValueError, or with `tolerant=True` ends the log
    there: a run killed while appending a row leaves half a line at the end,
    and resuming must not fail on it (the rows before it are intact, because
    rows are only ever appended and the file is rewritten atomically).
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        for rec in reader:
            try:
                rows.append({"step": int(rec["step"]), "epoch": int(rec["epoch"]),
                             "loss": float(rec["loss"]), "lr": float(rec["lr"]),
                             "grad_norm": float(rec["grad_norm"]),
                             "val_loss": float(rec["val_loss"]) if rec["val_loss"] else None,
                             "seconds": float(rec["seconds"])})
            except (TypeError, ValueError, KeyError) as exc:
                if tolerant:
                    note(f"{path}: ignoring line {reader.line_num} and after (an unfinished "
                          f"row, as a killed run leaves)")
                    break
                raise ValueError(f"{path}: line {reader.line_num}: malformed row "
                                 f"({type(exc).__name__}: {exc})") from None
    return rows


def log_text(rows: list[dict]) -> str:
    """A whole log.csv: the header and one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in rows:
        writer.writerow(format_row(row))
    return buffer.getvalue()


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row to the log at `path`, whole or not at all.

    Written unbuffered, so that a full disk fails here with what was written
    known; a row the disk took only part of is cut off again, so the log
    still ends with a whole row. The OSError is raised for the caller to
    report.
    """
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(format_row(row))
    with open(path, "ab", buffering=0) as stream:
        end = stream.seek(0, os.SEEK_END)
        data = memoryview(line.getvalue().encode("utf-8"))
        try:
            while data:
                data = data[stream.write(data):]
        except OSError:
            stream.truncate(end)
            raise
