"""Kill `convc train` at random moments and check that no work and no bit is lost.

    .venv/bin/python bench/faults.py                      # 100 kills, fresh processes
    .venv/bin/python bench/faults.py --kills 20 --launch fork --steps 40   # what `make test` runs

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

Prints one line per round and a summary; exits 0 if every check passed.

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


def slow_checkpoint_writes(pause: float) -> None:
    """Make every np.savez write half its bytes, fsync, sleep `pause` s, then the rest.

    runtime/checkpoint.py writes checkpoints with np.savez into a temporary
    file; this widens the window in which a kill finds that file half
    written. Only the child process that trains is patched.
    """
    real = np.savez

    def savez(file, *args, **kwds):
        buffer = io.BytesIO()
        real(buffer, *args, **kwds)
        data = buffer.getvalue()
        half = len(data) // 2
        file.write(data[:half])
        file.flush()
        os.fsync(file.fileno())
        time.sleep(pause)
        file.write(data[half:])

    np.savez = savez


def child_main(argv: list[str], pause: float) -> int:
    if pause > 0:
        slow_checkpoint_writes(pause)
    from convc.cli import main

    return main(argv)


# ---------------------------------------------------------------------------
# Starting and killing runs
# ---------------------------------------------------------------------------


class Run:
    """One `convc train` process, forked or executed; output goes to `log`."""

    def __init__(self, argv: list[str], pause: float, launch: str, log: Path):
        self.started = time.monotonic()
        self.returncode: int | None = None
        with open(log, "ab") as stream:
            if launch == "exec":
                command = [sys.executable, str(Path(__file__).resolve()), "--child",
                           str(pause), "--", *argv]
                self.proc = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=str(ROOT))
                self.pid = self.proc.pid
                return
            self.proc = None
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 70
                try:
                    os.dup2(stream.fileno(), 1)
                    os.dup2(stream.fileno(), 2)
                    code = child_main(argv, pause)
                except BaseException:  # noqa: BLE001 - report anything, then exit
                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            self.pid = pid

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
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
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
    return 0 if identical and not tally.problems else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        # `faults.py --child PAUSE -- ARGS...`: one `convc ARGS...` with slowed writes.
        sys.exit(child_main(sys.argv[4:], float(sys.argv[2])))
    sys.exit(main())
