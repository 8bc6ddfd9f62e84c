"""Kill `convc train` at random moments and check that no work and no bit is lost.

    .venv/bin/python bench/faults.py                      # 100 kills, fresh processes
    .venv/bin/python bench/faults.py --kills 20 --launch fork --steps 40   # what `make test` runs
    .venv/bin/python bench/faults.py --cases files        # only the file-safety cases

What it does:

1. Trains a tiny model once without interruption (the reference), with a
   checkpoint after every step.
2. Trains the same model again in a fresh folder, and kills that process
   with SIGKILL at a random moment, then starts it again with `--resume`,
   over and over: at least `--kills` times. Every fifth kill lands
   during start-up (before the process has saved anything); the others
   land at a uniform moment of the steps after its first new checkpoint,
   so they hit steps and checkpoint writes alike. Each checkpoint write is
   slowed down (half the file is written, fsync-ed, then the process sleeps
   `--pause` seconds before writing the rest), so that a fair share of the
   kills finds a half-written temporary file; those are counted by the new
   `.ckpt-*.tmp` files a kill leaves behind.
3. After every kill, loads every checkpoint in the folder with
   `runtime.checkpoint.load_checkpoint` (which verifies its checksum):
   none may ever be unloadable.
4. When the killed run has finished, compares its final checkpoint with the
   reference: every parameter, optimizer and schedule array, and the loss
   column of log.csv, bit for bit. If a run finishes before enough kills
   landed, a new run starts in another folder and the count continues.

Then the file-safety cases (`--cases files` runs only these), each a real
`convc` process:

5. A full disk at every file convc writes: the run lock, the run manifest,
   model.py, log.csv (its header and a row), a checkpoint (the first and a
   later one), the PNGs, of a new run and of a resumed one; and the files of
   compile -o, graph -o, fmt --write, predict, eval --json/--png and bench
   --json. The child lowers its own RLIMIT_FSIZE as it opens the file, so the
   kernel fails the write half way through it. Each must end with convc's
   one-line error and a non-zero exit, leave every file it found unchanged or
   replaced by a whole new one, leave no temporary, and (for train) continue
   with --resume, once the disk has room, to bitwise the end of an unbroken run.
6. Two trainers on one --out: while one is held in the middle of a checkpoint
   write, a second (new, --resume, --overwrite) is refused, naming the first,
   which then ends bitwise as if alone.
7. A user's files in --out (model.py and log.csv, a project folder as `.`):
   refused, naming them, the folder left exactly as it was; with --overwrite,
   only the files convc writes are replaced.

Prints one line per round and per case and a summary; exits 0 if every
check passed.

`--launch exec` (the default) starts each run as a new Python process
(`python -m convc train ...` through a small wrapper that slows the
writes). `--launch fork` forks it from this process, which has already
imported convc: the killed process is just as real, but skips the second
or two of interpreter and import start-up, which is what lets `make test`
afford twenty kills.
"""
from __future__ import annotations

import os

# One BLAS thread, fixed before NumPy loads: the runs must be comparable bit
# for bit (same thread count), and a forked child must not inherit BLAS
# threads it cannot use.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "examples" / "seed.cell"
# Adam, a cosine schedule and a stateful carry: every kind of state a resume restores.
TRAIN_ARGS = ("--clips", "12", "--frames-in", "3", "--batch-size", "4", "--optimizer", "adam",
              "--lr", "0.01", "--schedule", "cosine", "--stateful", "--checkpoint-every", "1",
              "--keep", "3", "--threads", "1", "--seed", "0", "-q")


# ---------------------------------------------------------------------------
# The child: `convc train` with slow checkpoint writes
# ---------------------------------------------------------------------------


def slow_checkpoint_writes(pause: float, hold: Path | None = None) -> None:
    """Make every np.savez write half its bytes, fsync, sleep `pause` s, then the rest.

    runtime/checkpoint.py writes checkpoints with np.savez into a temporary
    file; this widens the window in which a kill finds that file half
    written. Only the child process that trains is patched. With `hold`, the
    first write stays half written until the file `hold` exists: a second
    trainer started meanwhile meets a run in the middle of a checkpoint.
    """
    real = np.savez
    waiting = [hold]

    def savez(file, *args, **kwds):
        buffer = io.BytesIO()
        real(buffer, *args, **kwds)
        data = buffer.getvalue()
        half = len(data) // 2
        file.write(data[:half])
        file.flush()
        os.fsync(file.fileno())
        time.sleep(pause)
        if waiting[0] is not None:
            deadline = time.monotonic() + 300
            while not waiting[0].exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            waiting[0] = None
        file.write(data[half:])

    np.savez = savez


def full_disk_at(pattern: str, nth: int, budget: int) -> None:
    """The `nth` file this process opens for writing whose name matches `pattern` finds the
    disk full after `budget` more bytes.

    As that file is opened, the process's RLIMIT_FSIZE is lowered to the file's size
    plus `budget`, so the kernel itself fails the write in the middle of the file
    (EFBIG, where a full disk gives ENOSPC; Python ignores SIGXFSZ), as it fails every
    later write past that size. Temporaries are matched by their own names
    (`.model.py.*.tmp`, `.ckpt-*.tmp`); an append (`log.csv`) keeps what is there.
    """
    import builtins
    import fnmatch
    import resource

    seen = [0]
    real_os_open, real_open, real_io_open = os.open, builtins.open, io.open

    def arm(path, appending: bool) -> None:
        name = os.path.basename(os.fsdecode(os.fspath(path)))
        if not fnmatch.fnmatchcase(name, pattern):
            return
        seen[0] += 1
        if seen[0] != nth:
            return
        size = os.path.getsize(path) if appending and os.path.exists(path) else 0
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = size + budget if hard == resource.RLIM_INFINITY else min(size + budget, hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        print(f"{FULL_DISK_MARK} {name} after {budget} bytes", file=sys.stderr, flush=True)

    def os_open(path, flags, *args, **kwds):
        if flags & (os.O_WRONLY | os.O_RDWR):
            arm(path, bool(flags & os.O_APPEND))
        return real_os_open(path, flags, *args, **kwds)

    def wrap(real):
        def open_(file, mode="r", *args, **kwds):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                arm(file, "a" in mode or "+" in mode)
            return real(file, mode, *args, **kwds)
        return open_

    os.open, builtins.open, io.open = os_open, wrap(real_open), wrap(real_io_open)


FULL_DISK_MARK = "faults: the disk is full at"


def child_main(argv: list[str], pause: float = 0.0, hold: Path | None = None,
               full_disk: str | None = None) -> int:
    if pause > 0 or hold is not None:
        slow_checkpoint_writes(pause, hold)
    if full_disk:
        pattern, nth, budget = full_disk.rsplit(":", 2)
        full_disk_at(pattern, int(nth), int(budget))
    from convc.cli import main

    return main(argv)


def child_options(pause: float = 0.0, hold: Path | None = None,
                  full_disk: str | None = None) -> list[str]:
    """The options of `faults.py --child` that make `child_main(argv, pause, hold, full_disk)`."""
    return ["--pause", str(pause), *(["--hold", str(hold)] if hold else []),
            *(["--full-disk", full_disk] if full_disk else [])]


# ---------------------------------------------------------------------------
# Starting and killing runs
# ---------------------------------------------------------------------------


class Run:
    """One `convc train` process, forked or executed; output goes to `log`."""

    def __init__(self, argv: list[str], pause: float, launch: str, log: Path | None, *,
                 hold: Path | None = None, full_disk: str | None = None,
                 cwd: Path | None = None):
        """`log=None` sends the output to a pipe (read by `output`) rather than a file:
        a process whose writes fail on purpose must still be able to say why."""
        self.started = time.monotonic()
        self.returncode: int | None = None
        self._pipe: int | None = None
        self._text = b""
        if log is None:
            read, write = os.pipe()
            self._pipe = read
        else:
            write = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if launch == "exec":
                command = [sys.executable, str(Path(__file__).resolve()), "--child",
                           *child_options(pause, hold, full_disk), "--", *argv]
                self.proc = subprocess.Popen(command, stdout=write, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=str(cwd or ROOT))
                self.pid = self.proc.pid
                return
            self.proc = None
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 70
                try:
                    if self._pipe is not None:
                        os.close(self._pipe)
                    os.dup2(write, 1)
                    os.dup2(write, 2)
                    if cwd is not None:
                        os.chdir(cwd)
                    code = child_main(argv, pause, hold, full_disk)
                except BaseException:  # noqa: BLE001 - report anything, then exit
                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            self.pid = pid
        finally:
            os.close(write)

    def output(self, timeout: float) -> tuple[int, str]:
        """Wait for a piped run: (exit status, what it printed)."""
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"convc (pid {self.pid}) ran past {timeout:.0f} s")
            ready, _, _ = select.select([self._pipe], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._pipe, 65536)
                if not chunk:
                    break
                self._text += chunk
        os.close(self._pipe)
        return self.wait(max(deadline - time.monotonic(), 1.0)), \
            self._text.decode("utf-8", "replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.proc is not None:
                self.returncode = self.proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"convc train (pid {self.pid}) ran past {timeout:.0f} s")
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> bool:
        """SIGKILL the process; False if it had already exited on its own."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            self.returncode = self.proc.returncode
        else:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return True


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def load_all(folder: Path) -> tuple[int, list[str], int | None]:
    """Load every checkpoint in `folder`: (how many loaded, problems, newest step)."""
    from convc.errors import CheckpointError
    from convc.runtime.checkpoint import list_checkpoints, load_checkpoint

    loaded, problems, newest = 0, [], None
    for path in list_checkpoints(folder):
        try:
            _, meta = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        loaded += 1
        newest = meta["step"]
    return loaded, problems, newest


def final_state(folder: Path, steps: int) -> tuple[dict[str, bytes], list[str]]:
    """The arrays of the final checkpoint (as bytes) and the log's losses (as text)."""
    import csv

    from convc.runtime.checkpoint import checkpoint_path, load_checkpoint

    arrays, _ = load_checkpoint(checkpoint_path(folder, steps))
    state = {name: np.ascontiguousarray(a).tobytes() + str(a.dtype).encode()
             for name, a in sorted(arrays.items())}
    with open(folder / "log.csv", newline="", encoding="utf-8") as stream:
        losses = [row["loss"] for row in csv.DictReader(stream)]
    return state, losses


def digest(state: dict[str, bytes], group: str) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        if name.startswith(group + "/"):
            h.update(name.encode() + b"\0" + state[name])
    return h.hexdigest()


@dataclass
class Tally:
    kills: int = 0
    mid_write: int = 0
    before_first_checkpoint: int = 0
    no_progress: int = 0
    loaded: int = 0
    rounds: int = 0
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


def run_reference(args, work: Path) -> tuple[Path, float, float]:
    """The uninterrupted run: (folder, start-up seconds, seconds per step).

    Start-up is the time until the first step's checkpoint exists less one
    step; a step is the time between the first and the last checkpoint
    appearing, divided by the steps between them (checkpoint writes included).
    """
    from convc.runtime.checkpoint import checkpoint_path

    out = work / "reference"
    argv = ["train", str(args.spec), "--steps", str(args.steps), "--out", str(out),
            *TRAIN_ARGS]
    first, last = checkpoint_path(out, 1), checkpoint_path(out, args.steps)
    seen: dict[Path, float] = {}
    run = Run(argv, args.pause, args.launch, work / "reference.log")
    while run.poll() is None:
        for path in (first, last):
            if path not in seen and path.exists():
                seen[path] = time.monotonic() - run.started
        if time.monotonic() - run.started > args.timeout:
            run.kill()
        time.sleep(0.002)
    if run.returncode != 0 or len(seen) < 2:
        raise SystemExit(f"faults: the reference run failed (exit {run.returncode}); see "
                         f"{work / 'reference.log'}:\n{(work / 'reference.log').read_text()}")
    per_step = (seen[last] - seen[first]) / max(1, args.steps - 1)
    return out, max(seen[first] - per_step, 0.01), per_step


def one_round(args, work: Path, index: int, timing: dict, rng, tally: Tally,
              wanted: int) -> Path:
    """Kill and resume one run until it finishes; returns its folder.

    A share (`--startup-kills`) of the kills lands at a uniform moment of the
    process's start-up, before it has saved anything. The others wait until
    the run has written its first new checkpoint and then land at a uniform
    moment of the next stretch of steps: long enough that the remaining steps
    last about as many kills as remain, never past the last step (after which
    only the PNGs are left to write). Timing start-up this way, rather than
    trusting the reference run's, keeps the kills where they are meant to be
    on a machine whose load changes.
    """
    from convc.runtime.checkpoint import checkpoint_path

    out = work / f"faulted-{index}"
    argv = ["train", str(args.spec), "--steps", str(args.steps), "--out", str(out), "--resume",
            *TRAIN_ARGS]
    log = work / f"faulted-{index}.log"
    newest = 0
    while True:
        left_kills = wanted - tally.kills
        # Temporary files an earlier kill left are swept by the next save; only new
        # ones show that this kill landed in the middle of a write.
        old_temps = set(out.glob(".ckpt-*.tmp")) if out.is_dir() else set()
        run = Run(argv, args.pause, args.launch, log)
        left = args.steps - newest
        if left_kills <= 0 or left <= 1:  # enough kills, or only the last step to go
            code = run.wait(args.timeout)
            break
        # Every 1/share-th kill (the 1st, 6th, 11th, ... by default), not a coin toss:
        # a short run of the script still gets its start-up kills, the first of them
        # before the run has any checkpoint at all.
        in_startup = args.startup_kills > 0 and \
            tally.kills % max(1, round(1 / args.startup_kills)) == 0
        if in_startup:
            time.sleep(rng.uniform(0.0, timing["startup"]))
        else:
            first = checkpoint_path(out, newest + 1)
            while not first.exists() and run.poll() is None:
                if time.monotonic() - run.started > args.timeout:
                    break
                time.sleep(0.003)
            # Learn start-up from the runs themselves (a moving average).
            seen = time.monotonic() - run.started - timing["per_step"]
            timing["startup"] = 0.7 * timing["startup"] + 0.3 * max(seen, 0.01)
            aim = left / (left_kills + 1)
            stretch = min(2.0 * max(aim, 1.0), max(left - 2.0, 0.5))
            time.sleep(rng.uniform(0.0, stretch * timing["per_step"]))
        if not run.kill():
            code = run.returncode
            break
        tally.kills += 1
        temps = sorted(p.name for p in set(out.glob(".ckpt-*.tmp")) - old_temps) \
            if out.is_dir() else []
        tally.mid_write += bool(temps)
        loaded, problems, step = load_all(out)
        tally.loaded += loaded
        tally.before_first_checkpoint += loaded == 0 and not problems
        tally.no_progress += (step or 0) == newest and not temps
        tally.problems += [f"after kill {tally.kills}: {p}" for p in problems]
        newest = step if step is not None else newest
        if args.verbose:
            where = "start-up" if in_startup else "training"
            print(f"  kill {tally.kills:3d} ({where}) at {time.monotonic() - run.started:6.2f} "
                  f"s: newest checkpoint step {step}, {loaded} loaded"
                  f"{', half-written ' + temps[0] if temps else ''}", flush=True)
    if code != 0:
        raise SystemExit(f"faults: run {out} ended with exit {code}; see {log}:\n"
                         f"{log.read_text()[-3000:]}")
    return out


# ---------------------------------------------------------------------------
# File safety: a full disk at every file convc writes, two trainers on one
# folder, a user's files in --out
# ---------------------------------------------------------------------------

# A run short enough to repeat for every case: Adam, a schedule, a checkpoint a step.
FILE_STEPS = 4
PNG_END = b"IEND\xaeB`\x82"


def is_temporary(name: str) -> bool:
    from convc.runtime.atomic import TEMP_NAME

    return bool(TEMP_NAME.match(name)) or (name.startswith(".ckpt-") and name.endswith(".tmp"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} \
        if folder.is_dir() else {}


def whole(path: Path) -> str | None:
    """Why `path` is not a whole file of its kind, or None when it is."""
    import ast
    import json

    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".png"):
            ok = data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(PNG_END)
            return None if ok else "a PNG cut short"
        if name.startswith("ckpt-") and name.endswith(".npz"):
            from convc.runtime.checkpoint import load_checkpoint

            load_checkpoint(path)
        elif name.endswith((".npy", ".npz")):
            loaded = np.load(path, allow_pickle=False)
            if hasattr(loaded, "files"):
                [loaded[k] for k in loaded.files]
                loaded.close()
        elif name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".py"):
            ast.parse(data)
        elif name.endswith(".csv"):
            lines = data.decode("utf-8").split("\n")
            width = lines[0].count(",")
            if lines[-1] != "" or any(line.count(",") != width for line in lines[:-1]):
                return "a row cut short"
    except Exception as exc:  # noqa: BLE001 - any failure to read it back is the finding
        return f"unreadable: {type(exc).__name__}: {exc}"
    return None


class FileCases:
    """Runs the cases and keeps the tally: one line per case."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work / "files"
        self.work.mkdir(parents=True, exist_ok=True)
        self.cases = 0
        self.problems: list[str] = []
        self.count = 0

    def convc(self, argv, *, full_disk: str | None = None, cwd: Path | None = None,
              hold: Path | None = None) -> tuple[int, str]:
        run = Run([str(a) for a in argv], 0.0, self.args.launch, None, full_disk=full_disk,
                  cwd=cwd, hold=hold)
        return run.output(self.args.timeout)

    def train_argv(self, out: Path, *extra) -> list:
        return ["train", self.args.spec, "--steps", FILE_STEPS, "--out", out, *TRAIN_ARGS,
                *extra]

    def folder(self, what: str) -> Path:
        self.count += 1
        return self.work / f"{self.count:02d}-{what}"

    def report(self, case: str, problems: list[str], detail: str = "") -> None:
        self.cases += 1
        self.problems += [f"{case}: {p}" for p in problems]
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(f"faults: files: {case}: {status}{' (' + detail + ')' if detail and not problems else ''}",
              flush=True)

    # -------------------------------------------------------------- checks
    @staticmethod
    def refused(code: int, text: str, expect: str | None = None) -> list[str]:
        """A clean refusal: a non-zero exit with convc's one-line error, no traceback."""
        problems = []
        text = "\n".join(line for line in text.splitlines()
                         if not line.startswith(FULL_DISK_MARK))
        if code == 0:
            problems.append("exited 0")
        if "Traceback" in text:
            problems.append("a traceback: " + text.strip().splitlines()[-1][:200])
        elif "convc: error:" not in text and "error:" not in text:
            problems.append(f"no error message (printed {text.strip()[-200:]!r})")
        if expect and expect not in text:
            problems.append(f"the message lacks {expect!r}: {text.strip()[-300:]!r}")
        return problems

    @staticmethod
    def fired(text: str, pattern: str) -> list[str]:
        return [] if FULL_DISK_MARK in text else [f"convc never wrote a file {pattern}"]

    @staticmethod
    def intact(folder: Path, before: dict[str, bytes], replaced=(), may_go=()) -> list[str]:
        """Every file of `before` is still there (but those in `may_go`), unchanged or
        (those in `replaced`) replaced by a whole new one; no temporary is left; every
        file is whole."""
        problems = []
        now = snapshot(folder)
        for name, data in before.items():
            if name not in now:
                if name not in may_go:
                    problems.append(f"{name} is gone")
            elif now[name] != data and name not in replaced:
                problems.append(f"{name} was changed")
        left = [n for n in now if is_temporary(n)]
        if left:
            problems.append(f"temporaries left behind: {', '.join(left)}")
        for name in now:
            if not is_temporary(name) and (why := whole(folder / name)):
                problems.append(f"{name}: {why}")
        return problems

    # --------------------------------------------------------------- cases
    def reference(self) -> None:
        self.ref = self.folder("reference")
        code, text = self.convc(self.train_argv(self.ref))
        if code != 0:
            raise SystemExit(f"faults: files: the reference run failed (exit {code}):\n{text}")
        self.ref_state = final_state(self.ref, FILE_STEPS)
        self.sizes = {n: len(b) for n, b in snapshot(self.ref).items()}
        self.ckpt = self.ref / f"ckpt-{FILE_STEPS:08d}.npz"
        # A run folder stopped half way, to resume from: the reference without its last
        # two checkpoints, as a kill after step 2's checkpoint leaves it.
        self.half = self.folder("half")
        shutil.copytree(self.ref, self.half)
        for step in (FILE_STEPS - 1, FILE_STEPS):
            (self.half / f"ckpt-{step:08d}.npz").unlink()

    def recovered(self, out: Path) -> list[str]:
        """After the disk has room again, --resume ends where an unbroken run ends."""
        code, text = self.convc(self.train_argv(out, "--resume"))
        if code != 0:
            return [f"--resume afterwards exited {code}: {text.strip()[-300:]!r}"]
        problems = self.intact(out, {}, ())
        if final_state(out, FILE_STEPS) != self.ref_state:
            problems.append("--resume afterwards does not end bit for bit where an unbroken "
                            "run ends")
        return problems

    def train_full_disk(self) -> None:
        """`convc train` (new and resumed runs) with the disk full at each file it writes."""
        half = lambda name: max(1, self.sizes[name] // 2)  # noqa: E731
        ckpt = half(f"ckpt-{FILE_STEPS:08d}.npz")
        targets = [  # (what, pattern, nth, bytes): the nth write of the file gets that far
            ("the run lock (a disk full from the start)", ".convc-lock", 1, 0),
            ("the manifest", "..convc-run.json.*.tmp", 1, half(".convc-run.json")),
            ("model.py", ".model.py.*.tmp", 1, half("model.py")),
            ("log.csv's header", ".log.csv.*.tmp", 1, 20),
            ("a row of log.csv", "log.csv", 2, 8),
            ("the first checkpoint", ".ckpt-*.tmp", 1, ckpt),
            ("the second checkpoint", ".ckpt-*.tmp", 2, ckpt),
            ("predictions.png", ".predictions.png.*.tmp", 1, half("predictions.png")),
            ("loss.png", ".loss.png.*.tmp", 1, half("loss.png")),
        ]
        for resumed in (False, True):
            for what, pattern, nth, budget in targets:
                case = f"train{' --resume' if resumed else ''}, the disk full at {what}"
                out = self.folder("full-train")
                if resumed:
                    shutil.copytree(self.half, out)
                before = snapshot(out)
                argv = self.train_argv(out, *(["--resume"] if resumed else []))
                code, text = self.convc(argv, full_disk=f"{pattern}:{nth}:{budget}")
                problems = self.fired(text, pattern) + self.refused(code, text)
                # What the run replaces may be new and whole; the checkpoints it keeps
                # (--keep) are checked by loading them and by resuming.
                checkpoints = {n for n in before if n.startswith("ckpt-")}
                problems += self.intact(out, before, set(before) - checkpoints, checkpoints)
                loaded, unloadable, newest = load_all(out)
                problems += [f"unloadable checkpoint: {p}" for p in unloadable]
                if not problems:
                    problems += self.recovered(out)
                self.report(case, problems, f"stopped with {loaded} checkpoints, newest "
                            f"step {newest}; --resume ends bit for bit as an unbroken run")

    def outputs_full_disk(self) -> None:
        """Every other file convc writes, with the disk full half way through it: the
        command fails with a clear error and the file it replaces is the old one."""
        spec = self.args.spec
        work = self.folder("outputs")
        work.mkdir()
        messy = work / "messy.cell"
        cases = [  # (command, argv, the file written, before the fault: "run" or bytes)
            ("compile -o", ["compile", spec, "-o", work / "gen.py"], work / "gen.py", "run"),
            ("graph -o", ["graph", spec, "-o", work / "graph.dot"], work / "graph.dot", "run"),
            ("fmt --write", ["fmt", "--write", messy], messy,
             self.args.spec.read_text().replace(" = ", "  =  ").encode()),
            ("predict: predictions.npy", ["predict", spec, "--checkpoint", self.ckpt,
                                          "--data", "synthetic", "--clips", "4", "--out", work],
             work / "predictions.npy", "run"),
            ("predict: predictions.png", ["predict", spec, "--checkpoint", self.ckpt,
                                          "--data", "synthetic", "--clips", "4", "--out", work],
             work / "predictions.png", "run"),
            ("eval --json", ["eval", spec, "--checkpoint", self.ckpt, "--json",
                             work / "eval.json"], work / "eval.json", "run"),
            ("eval --png", ["eval", spec, "--checkpoint", self.ckpt, "--png",
                            work / "eval.png"], work / "eval.png", "run"),
            ("bench --json", ["bench", spec, "--steps", "1", "--warmup", "0", "--no-peak",
                              "--threads", "1", "--batch", "2", "--frames", "3", "--json",
                              work / "bench.json"], work / "bench.json", "run"),
        ]
        for command, argv, target, first in cases:
            case = f"{command}, the disk full at {target.name}"
            problems = []
            if first == "run":
                code, text = self.convc(argv)
                if code != 0 or not target.exists():
                    self.report(case, [f"without a fault it exited {code}: "
                                       f"{text.strip()[-300:]!r}"])
                    continue
            else:
                target.write_bytes(first)
            before = snapshot(work)
            pattern = f".{target.name}.*.tmp"
            code, text = self.convc(argv, full_disk=f"{pattern}:1:"
                                                    f"{max(1, len(before[target.name]) // 2)}")
            problems += self.fired(text, pattern) + self.refused(code, text)
            problems += self.intact(work, before)
            if first != "run" and not problems:  # the same command, with room, does write it
                code, text = self.convc(argv)
                if code != 0 or target.read_bytes() == first:
                    problems.append(f"with room on the disk it exited {code} and "
                                    f"{'did not change' if code == 0 else 'printed'} "
                                    f"{target.name if code == 0 else text.strip()[-200:]!r}")
            self.report(case, problems, "the old file kept, no temporary left")

    def user_files(self) -> None:
        """--out naming a folder with the user's own files: refused, the folder as it was."""
        def user_folder() -> Path:
            out = self.folder("user")
            out.mkdir()
            (out / "model.py").write_text("# my own model\n")
            (out / "log.csv").write_text("my,own,log\n")
            return out

        for extra in ([], ["--resume"]):
            out = user_folder()
            before = snapshot(out)
            code, text = self.convc(self.train_argv(out, *extra))
            problems = self.refused(code, text, "would overwrite")
            problems += [f"the message does not name {n}" for n in ("model.py", "log.csv")
                         if n not in text]
            if snapshot(out) != before:
                problems.append(f"the folder changed: {sorted(snapshot(out))} after "
                                f"{sorted(before)}")
            self.report(f"train{' --resume' if extra else ''} --out a folder holding the "
                        f"user's model.py and log.csv", problems, "refused, the folder as it was")

        project = self.folder("project")
        project.mkdir()
        shutil.copy(self.args.spec, project / "own.cell")
        (project / "notes.txt").write_text("mine\n")
        before = snapshot(project)
        code, text = self.convc(["train", "own.cell", "--steps", FILE_STEPS, "--out", ".",
                                 *TRAIN_ARGS], cwd=project)
        problems = self.refused(code, text, "not made by convc")
        if snapshot(project) != before or any(p.is_dir() for p in project.iterdir()):
            problems.append(f"the folder changed: {sorted(p.name for p in project.iterdir())}")
        self.report("train --out . in a project folder", problems, "refused, the folder as it was")

        out = user_folder()
        (out / "notes.txt").write_text("mine\n")
        code, text = self.convc(self.train_argv(out, "--overwrite"))
        problems = [] if code == 0 else [f"exited {code}: {text.strip()[-300:]!r}"]
        if (out / "notes.txt").read_text() != "mine\n":
            problems.append("notes.txt, which convc does not write, changed")
        if (out / "model.py").read_text() == "# my own model\n":
            problems.append("model.py was not replaced")
        self.report("train --overwrite in a folder with the user's files", problems,
                    "replaced model.py and log.csv, left notes.txt")

    def two_trainers(self) -> None:
        """A second trainer on a folder another one is training in, mid checkpoint write."""
        out = self.folder("two")
        release = self.work / f"{out.name}.release"
        first = Run([str(a) for a in self.train_argv(out)], 0.0, self.args.launch,
                    self.work / f"{out.name}.log", hold=release)
        problems = []
        try:
            deadline = time.monotonic() + self.args.timeout
            while not (out.is_dir() and any(n.startswith(".ckpt-") for n in os.listdir(out))):
                if first.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"faults: files: the first trainer ended (exit "
                                     f"{first.returncode}) before its first checkpoint")
                time.sleep(0.01)
            for extra in ([], ["--resume"], ["--overwrite"]):
                code, text = self.convc(self.train_argv(out, *extra))
                problems += [f"a second trainer{' with ' + extra[0] if extra else ''}: {p}"
                             for p in self.refused(code, text, "in use by another training run")]
                if f"process {first.pid}" not in text:
                    problems.append(f"the refusal does not name process {first.pid}")
            if first.poll() is not None:
                problems.append(f"the first trainer ended (exit {first.returncode}) while held")
        finally:
            release.touch()
        code = first.wait(self.args.timeout)
        if code != 0:
            problems.append(f"the first trainer exited {code}; see {self.work / out.name}.log")
        else:
            steps = [line.split(",")[0] for line in
                     (out / "log.csv").read_text().splitlines()[1:]]
            if steps != [str(i) for i in range(1, FILE_STEPS + 1)]:
                problems.append(f"log.csv holds steps {','.join(steps)}")
            if final_state(out, FILE_STEPS) != self.ref_state:
                problems.append("the first trainer's result differs from an undisturbed run's")
            problems += self.intact(out, {})
        self.report("a second trainer (new, --resume, --overwrite) while one is mid "
                    "checkpoint", problems, "refused, naming the first; the first ends "
                    "bit for bit as if alone")


def file_safety(args, work: Path) -> list[str]:
    """Every file-safety case; returns the problems found."""
    t0 = time.monotonic()
    cases = FileCases(args, work)
    cases.reference()
    cases.user_files()
    cases.two_trainers()
    cases.outputs_full_disk()
    cases.train_full_disk()
    print(f"faults: file safety: {cases.cases} cases in {time.monotonic() - t0:.1f} s, "
          f"{len(cases.problems)} problems", flush=True)
    return cases.problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs at least (default 100)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: 2 per kill, at least 40)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="the model to train")
    parser.add_argument("--launch", choices=("exec", "fork"), default="exec",
                        help="a new Python process per run (default), or a fork of this one")
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds each checkpoint write sleeps half written (default 0.05)")
    parser.add_argument("--startup-kills", type=float, default=0.2, metavar="SHARE",
                        help="share of the kills aimed at start-up (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the runs (default: a temporary one, removed after)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="longest one run may take, seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per kill")
    parser.add_argument("--cases", choices=("all", "kills", "files"), default="all",
                        help="the SIGKILL rounds, the file-safety cases (a full disk at every "
                             "file convc writes, two trainers, a user's files in --out), or "
                             "both (default)")
    args = parser.parse_args(argv)
    if args.launch == "fork" and not hasattr(os, "fork"):
        parser.error("--launch fork needs os.fork (POSIX)")
    args.steps = args.steps or max(40, 2 * args.kills)
    args.spec = args.spec.resolve()

    work = args.work or Path(tempfile.mkdtemp(prefix="convc-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.launch == "fork":
        # Done once here and inherited by every fork: the imports, the parser
        # tables a first compile builds, and matplotlib for the PNGs.
        import convc.api
        import convc.cli  # noqa: F401
        import convc.runtime.plots  # noqa: F401
        import convc.runtime.train  # noqa: F401

        convc.api.load(args.spec)
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except ImportError:
            pass
    try:
        ok = kill_rounds(args, work, t0) if args.cases in ("all", "kills") else True
        problems = file_safety(args, work) if args.cases in ("all", "files") else []
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"faults: FAIL: {problem}")
    return 0 if ok and not problems else 1


def kill_rounds(args, work: Path, t0: float) -> bool:
    """The SIGKILL rounds; prints the summary and returns whether every check passed."""
    reference, startup, per_step = run_reference(args, work)
    ref_state, ref_losses = final_state(reference, args.steps)
    print(f"faults: reference run of {args.spec.name}, {args.steps} steps: start-up "
          f"{startup:.2f} s, {per_step * 1000:.0f} ms a step (with a checkpoint)",
          flush=True)
    rng = random.Random(args.seed)
    timing = {"startup": startup, "per_step": per_step}
    tally = Tally()
    identical = True
    while tally.kills < args.kills or tally.rounds == 0:
        before = tally.kills
        out = one_round(args, work, tally.rounds, timing, rng, tally, args.kills)
        tally.rounds += 1
        state, losses = final_state(out, args.steps)
        same = state == ref_state and losses == ref_losses
        identical &= same
        if not same:
            differ = sorted(k for k in ref_state if state.get(k) != ref_state[k])
            tally.problems.append(f"{out.name}: differs from the reference in "
                                  f"{differ or 'the logged losses'}")
        print(f"faults: round {tally.rounds}: {tally.kills - before} kills, final state "
              f"{'identical to' if same else 'DIFFERENT from'} the reference", flush=True)
    seconds = time.monotonic() - t0
    print(f"faults: survived {tally.kills} SIGKILLs in {tally.rounds} "
          f"round{'s' if tally.rounds != 1 else ''}, {seconds:.1f} s: {tally.mid_write} during "
          f"a checkpoint write, {tally.no_progress} before the run saved anything "
          f"({tally.before_first_checkpoint} of them before the first checkpoint of all)")
    print(f"faults: {tally.loaded} checkpoints loaded after kills, "
          f"{sum(p.startswith('after kill') for p in tally.problems)} unloadable")
    print(f"faults: final parameters {'equal' if identical else 'DO NOT equal'} the "
          f"uninterrupted run's bit for bit (param sha256 {digest(ref_state, 'param')[:16]}, "
          f"{len(ref_losses)} logged losses)")
    for problem in tally.problems:
        print(f"faults: FAIL: {problem}")
    return identical and not tally.problems


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        # `faults.py --child [OPTIONS] -- ARGS...`: one `convc ARGS...` with slowed writes,
        # a held checkpoint or a full disk (see child_options).
        split = sys.argv.index("--")
        child = argparse.ArgumentParser(prog="faults.py --child")
        child.add_argument("--pause", type=float, default=0.0)
        child.add_argument("--hold", type=Path, default=None)
        child.add_argument("--full-disk", default=None)
        opts = child.parse_args(sys.argv[2:split])
        sys.exit(child_main(sys.argv[split + 1:], opts.pause, opts.hold, opts.full_disk))
    sys.exit(main())
