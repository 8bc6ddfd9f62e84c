"""The `convc` command: check, compile, look at, train and use `.cell` models.

Every subcommand is one small function `cmd_<name>(args) -> int`; `main`
builds the parser, runs the command and turns the errors a user can fix
into one line on stderr and exit status 1 (spec errors print gcc-style
diagnostics instead). Bad arguments exit 2, as argparse does; Ctrl-C
exits 130 (SIGTERM during training: 143). The compiler and the runtime
are imported inside the commands that need them; only `eval` and `bench`,
whose options runtime/evaluate.py and runtime/bench.py define, are
imported to build the parser.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from convc import __version__
from convc.argtypes import nonneg_int as _nonneg_int
from convc.argtypes import positive_float as _positive_float
from convc.argtypes import positive_int as _positive_int
from convc.argtypes import train_type as _train_type
from convc.errors import ConvcError

EMITS = ("py", "ir", "dot", "json")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions and epilogs."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _require_file(path: str) -> Path:
    """FILE, or the E001/E002 diagnostic `check` gives for it (missing, not a file,
    unreadable, not UTF-8, too large), before any work starts."""
    from convc.spec.parser import read_spec

    read_spec(path)
    return Path(path)


def _add_recompute(p) -> None:
    p.add_argument("--recompute", type=_positive_int, metavar="K", default=None,
                   help="keep the forward values the backward pass needs for windows of K "
                        "steps only, recomputing each window (less memory, more compute)")


def _load(args, debug_nans: bool = False):
    """Compile the command's FILE (and --model) in memory; warnings go to stderr."""
    import convc.api as api

    _require_file(args.file)
    mod = api.load(args.file, model=getattr(args, "model", None), debug_nans=debug_nans,
                   recompute=getattr(args, "recompute", None))
    _print_warnings(mod.compiled.warnings)
    return mod


def _print_warnings(warnings) -> None:
    if warnings:
        from convc.spec.diagnostics import Diagnostic

        for w in warnings:
            text = w.format() if isinstance(w, Diagnostic) else str(w)
            print(text, file=sys.stderr)


def _inputs(mod) -> tuple[str, ...]:
    """The files a compile read: the spec and everything it imports."""
    return (mod.spec_path, *mod.compiled.program.modules)


def _write(path: Path, content, mod) -> None:
    """Write an output the user named, never over the spec, its imports or any .cell file."""
    from convc.runtime.atomic import write_output

    write_output(path, content, protected=_inputs(mod))


def _emits(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in EMITS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(unknown) or '(none)'}; choose from {', '.join(EMITS)}")
    return list(dict.fromkeys(kinds))


# ---------------------------------------------------------------------------
# check, compile, graph, fmt, summary
# ---------------------------------------------------------------------------


def cmd_check(args) -> int:
    from convc.compiler.driver import check
    from convc.spec.diagnostics import CellError, format_diagnostics, printable, summary_line

    # a missing or unreadable file is diagnostic E001, in the form asked for, as any other
    try:
        diags = check(args.file, model=args.model)
    except CellError as exc:
        if args.diagnostics_format == "json":
            print(format_diagnostics(exc.diagnostics, "json"))
        else:
            print(format_diagnostics(exc.diagnostics), file=sys.stderr)
        return 1
    if args.diagnostics_format == "json":
        print(format_diagnostics(diags, "json"))
        return 0
    if diags:
        body = format_diagnostics(diags)
        print(body.rsplit("\n", 1)[0], file=sys.stderr)  # the summary line goes below
    print(f"{printable(args.file)}: ok ({summary_line(diags)})")
    return 0


def cmd_compile(args) -> int:
    mod = _load(args, debug_nans=args.debug_nans)
    c = mod.compiled
    texts = {"py": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json()}
    if args.output is None:
        for kind in args.emit:
            if len(args.emit) > 1:
                print(f"# ---- {kind} ----")
            sys.stdout.write(texts[kind])
    elif len(args.emit) == 1:
        _write(Path(args.output), texts[args.emit[0]], mod)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        out = Path(args.output)
        stem = out.with_suffix("") if out.suffix else out
        for kind in args.emit:
            path = stem.with_name(f"{stem.name}.{kind}")
            _write(path, texts[kind], mod)
            print(f"wrote {path}", file=sys.stderr)
    if args.recompute:
        sys.stderr.write(_recompute_report(args, mod, 10, 1))
    if args.timings:
        total = sum(c.timings.values())
        print("timings:", file=sys.stderr)
        for stage, seconds in c.timings.items():
            print(f"  {stage:<10} {seconds * 1000:9.2f} ms", file=sys.stderr)
        print(f"  {'total':<10} {total * 1000:9.2f} ms", file=sys.stderr)
        if c.pass_counts:
            print("passes (nodes changed):", file=sys.stderr)
            for name, count in c.pass_counts.items():
                print(f"  {name:<16} {count}", file=sys.stderr)
    return 0


def _graphviz_messages(stderr: bytes) -> list[str]:
    """What dot printed on stderr, one printable line each (control characters escaped)."""
    from convc.spec.diagnostics import printable

    text = stderr.decode("utf-8", "replace")
    return [printable(line.rstrip()) for line in text.splitlines() if line.strip()]


def cmd_graph(args) -> int:
    mod = _load(args)
    dot = mod.compiled.dot()
    if args.output is None:
        sys.stdout.write(dot)
        return 0
    out = Path(args.output)
    kind = out.suffix.lower().lstrip(".")
    if kind in ("dot", "gv"):
        _write(out, dot, mod)
    elif kind in ("svg", "png", "pdf"):
        exe = shutil.which("dot")
        if exe is None:
            raise ConvcError(f"drawing {out.name} needs Graphviz's `dot` program, which is not "
                             f"on PATH; install Graphviz, or write DOT with -o "
                             f"{out.with_suffix('.dot')}")
        # dot draws to a pipe; the picture is then written as every output is
        result = subprocess.run([exe, f"-T{kind}"], input=dot.encode("utf-8"),
                                capture_output=True)
        messages = _graphviz_messages(result.stderr)
        if result.returncode != 0:
            said = "; ".join(messages) or "it printed nothing"
            raise ConvcError(f"Graphviz's dot ({exe}) failed drawing {out} (exit "
                             f"{result.returncode}): {said}")
        if not result.stdout:
            raise ConvcError(f"Graphviz's dot ({exe}) drew nothing for {out}"
                             + (f": {'; '.join(messages)}" if messages else ""))
        # A warning (an unknown colour or font, say) still gives a picture, but
        # one that may not look as meant: pass it on, marked as dot's.
        for message in messages:
            print(f"graphviz: {message}", file=sys.stderr)
        _write(out, result.stdout, mod)
    else:
        raise ConvcError(f"{out}: unknown graph format {out.suffix or '(none)'}; use .dot, "
                         f".svg, .png or .pdf")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_fmt(args) -> int:
    try:
        from convc.spec.format import format_source
    except ImportError as exc:
        if getattr(exc, "name", "") in ("convc.spec.format",):
            raise ConvcError("convc fmt is not available in this build "
                             "(convc.spec.format is missing)") from None
        raise
    from convc.spec.diagnostics import printable
    from convc.spec.parser import read_spec

    path = Path(args.file)
    text = read_spec(path)  # E001 / E002 as `check` reports them
    formatted = format_source(text, args.file)
    name = printable(args.file)
    if args.check:
        if formatted != text:
            print(f"{name}: would reformat", file=sys.stderr)
            return 1
        print(f"{name}: already formatted")
        return 0
    if args.write:
        if formatted != text:
            from convc.runtime.atomic import write_atomic

            try:  # the old text or the new one survives a crash or a full disk, never half
                write_atomic(path, formatted)
            except OSError as exc:
                raise ConvcError(f"cannot write {path}: {exc.strerror or exc}; "
                                 f"{name} is unchanged") from None
            print(f"reformatted {name}")
        else:
            print(f"{name}: already formatted")
        return 0
    sys.stdout.write(formatted)
    return 0


def cmd_summary(args) -> int:
    from convc.runtime.summary import summary

    mod = _load(args)
    sys.stdout.write(summary(mod))
    sys.stdout.write("\n" + _recompute_report(args, mod, args.frames, args.batch))
    return 0


def _recompute_report(args, mod, steps, batch) -> str:
    """The memory plan with all steps kept against --recompute K (or K = 1 and ~sqrt(T))."""
    import convc.api as api
    from convc.runtime.summary import default_windows, recompute_report

    def meta(k):
        if mod.MODEL["memory"]["recompute"] == k:
            return mod.MODEL
        return api.load(args.file, model=getattr(args, "model", None), recompute=k).MODEL

    ks = [args.recompute] if args.recompute else default_windows(steps)
    return recompute_report(meta(None), {k: meta(k) for k in ks}, steps, batch=batch)


# ---------------------------------------------------------------------------
# train, predict
# ---------------------------------------------------------------------------

# CLI option -> train() keyword, for the options passed through as given.
_TRAIN_OPTIONS = ("data", "clips", "size", "steps", "epochs", "batch_size", "optimizer", "lr",
                  "momentum", "decay", "eps", "weight_decay", "schedule", "clip", "clip_mode",
                  "bptt", "stateful", "val_fraction", "val_every", "patience", "frames_in",
                  "frames_out", "dtype", "seed", "checkpoint_every", "keep", "threads")


def cmd_train(args) -> int:
    from convc.runtime.train import train

    mod = _load(args, debug_nans=args.debug_nans)
    out = args.out or os.path.join("runs", mod.MODEL["name"])
    options = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    result = train(mod, out=out, device=args.device, conv=args.conv, resume=args.resume,
                   overwrite=args.overwrite, progress=False if args.quiet else None,
                   poison=True if args.poison else None, deterministic=args.deterministic,
                   ignore_memory_limit=args.ignore_memory_limit,
                   **options)
    if result.history:
        print(result.summary())
    print(f"wrote {result.out}/")
    descriptions = {"model": "the generated model (import with convc.api.import_generated)",
                    "log": "one row per step: loss, lr, grad_norm, val_loss",
                    "checkpoint": "parameters and training state (continue with --resume)",
                    "predictions": "inputs, targets and predictions of validation clips",
                    "loss plot": "the loss curves"}
    for kind, path in result.paths().items():
        print(f"  {Path(path).name:<20} {descriptions[kind]}")
    return 0


def cmd_predict(args) -> int:
    """convc.runtime.predict does the work; this parses, refuses bad outputs and prints."""
    from convc.runtime import predict as P

    mod = _load(args)
    out = Path(args.out)
    # refused before the work: an output that would replace the spec, its imports, the
    # checkpoint or the data (P.save_npy and P.save_png check again, with what was read)
    P.check_outputs(out, (*_inputs(mod), args.checkpoint, args.data))
    pred = P.predict(mod, args.checkpoint, data=args.data, clips=args.clips, steps=args.steps,
                     seed=args.seed, allow_nonfinite=args.allow_nonfinite, device=args.device,
                     conv=args.conv)
    npy = P.save_npy(pred, out)
    print(pred.describe())
    print(f"wrote {npy}  {tuple(pred.predictions.shape)} float32 (N, T, C, H, W)")
    try:
        print(f"wrote {P.save_png(pred, out)}")
    except ConvcError as exc:
        print(f"note: no PNG: {exc}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# gradcheck, doctor, eval, bench
# ---------------------------------------------------------------------------


def cmd_gradcheck(args) -> int:
    """Float64 finite differences along random directions against the generated BPTT."""
    import json

    from convc.runtime.gradcheck import SAFETY, gradcheck

    mod = _load(args)
    if args.json:  # refuse a bad output name before the check runs
        from convc.runtime.atomic import check_output

        check_output(Path(args.json), _inputs(mod))
    report = gradcheck(mod, batch=args.batch, frames=args.frames, frames_out=args.frames_out,
                       seed=args.seed, dirs=args.dirs, bptt=args.bptt, eps=args.eps,
                       tolerance=args.tolerance)
    limit = (f"a relative error within {SAFETY:g}x the finite differences' resolution"
             + (f" or {args.tolerance:g}" if args.tolerance is not None else ""))
    print(f"gradient check of {report.model}: float64, batch {report.batch}, "
          f"{report.frames} steps{f', bptt {args.bptt}' if args.bptt else ''}, "
          f"{args.dirs} random directions per parameter, poisoned buffers")
    print(f"loss {report.loss:.6g}, its rounding noise {report.noise:.1e}; "
          f"{'steps from --eps ' + format(args.eps, 'g') if args.eps else 'step sweep'}; "
          f"a parameter passes with {limit}")
    width = max([len(p.name) for p in report.params] + [len("parameter")])
    print(f"  {'parameter':<{width}}  {'error':>8}  {'resolution':>10}  {'step':>7}")
    for p in report.params:
        if p.status == "unchecked":
            print(f"  {p.name:<{width}}  {'-':>8}  {'-':>10}  {'-':>7}  not checked: {p.reason}")
            continue
        print(f"  {p.name:<{width}}  {p.error:8.1e}  {p.resolution:10.1e}  {p.step:7.1e}  "
              f"{p.status}")
    checked = [p for p in report.params if p.status != "unchecked"]
    worst = max((p.error for p in checked), default=0.0)
    tail = (f"worst error {worst:.1e}; {report.evaluations} loss evaluations, "
            f"{report.seconds:.1f} s")
    n = len(report.params)
    if report.failed:
        print(f"FAIL ({len(report.failed)} of {n} parameters: "
              f"{', '.join(p.name for p in report.failed)}): {tail}")
    elif report.unchecked:
        print(f"UNCHECKED: {len(checked)} of {n} parameters agree; "
              f"{', '.join(p.name for p in report.unchecked)} could not be checked at this "
              f"point (try another --seed): {tail}")
    else:
        print(f"PASS: all {n} parameters agree: {tail}")
    if args.json:
        _write(Path(args.json), json.dumps(report.to_json(), indent=1) + "\n", mod)
    return 1 if report.failed else (3 if report.unchecked else 0)


def cmd_doctor(args) -> int:
    from convc.runtime.doctor import format_report, report

    print(format_report(report()))
    return 0


def _optional(module: str):
    """Import an optional part of convc, or None if that module is not there."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) == module:
            return None
        raise


def cmd_eval(args) -> int:
    evaluate = _optional("convc.runtime.evaluate")
    if evaluate is None or not hasattr(evaluate, "main_eval"):
        raise ConvcError("convc eval is not available in this build "
                         "(convc.runtime.evaluate is missing)")
    _require_file(args.spec)
    return int(evaluate.main_eval(args) or 0)


def cmd_bench(args) -> int:
    bench = _optional("convc.runtime.bench")
    run = getattr(bench, "main_bench", None) or getattr(bench, "run", None)
    if run is None:
        raise ConvcError("convc bench is not available in this build "
                         "(convc.runtime.bench is missing)")
    if getattr(args, "file", None) is not None:
        _require_file(args.file)
    return int(run(args) or 0)


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


def _add_file(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("file", metavar="FILE", help="a .cell file")
    if with_model:
        p.add_argument("--model", metavar="NAME", default=None,
                       help="which model of FILE (default: its last one)")


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (NumPy) or gpu (CuPy); default cpu")
    p.add_argument("--conv", choices=("numpy", "chainer"), default="numpy",
                   help="convolution: convc's own im2col+GEMM, or Chainer's; default numpy")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="synthetic (moving digits), synthetic:shapes, sklearn-digits, "
                                  "or a .npy/.npz clip file (N, T, [C,] H, W); default synthetic")
    g.add_argument("--clips", type=_train_type("clips"), metavar="N",
                   help="sequences to generate (default 512) or to keep from a file")
    g.add_argument("--size", type=_train_type("size"), metavar="PX",
                   help="frame size in pixels; fixed by the model, checked if given")
    g.add_argument("--frames-in", type=_train_type("frames_in"), metavar="T",
                   help="input frames per sequence (default 10)")
    g.add_argument("--frames-out", type=_train_type("frames_out"), metavar="T",
                   help="frames to predict, forecast models (default 10)")
    g.add_argument("--val-fraction", type=_train_type("val_fraction"), metavar="F",
                   help="share of the sequences held out for validation (default 0.1)")
    g = p.add_argument_group("optimisation (defaults: the spec's train block, then built-in)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_train_type("steps"), metavar="N",
                        help="optimizer steps (default 200); with --resume, the total the "
                             "run ends at, not the number of steps to add")
    length.add_argument("--epochs", type=_train_type("epochs"), metavar="N", help="passes over the data")
    g.add_argument("--batch-size", type=_train_type("batch_size"), metavar="N", help="default 8")
    g.add_argument("--optimizer", choices=("sgd", "momentum", "nesterov", "adam", "rmsprop"),
                   help="default adam")
    g.add_argument("--lr", type=_train_type("lr"), help="learning rate (default 1e-3)")
    g.add_argument("--momentum", type=_train_type("momentum"), help="SGD/RMSProp momentum")
    g.add_argument("--decay", type=_train_type("decay"), help="RMSProp decay (PyTorch's alpha; default 0.9)")
    g.add_argument("--eps", type=_train_type("eps"), help="Adam/RMSProp epsilon")
    g.add_argument("--weight-decay", type=_train_type("weight_decay"), help="L2 penalty added to the gradient")
    g.add_argument("--schedule", metavar="NAME",
                   help="constant, step, cosine or plateau, with options as "
                        "'step:step_size=100,gamma=0.5'")
    g.add_argument("--clip", type=_train_type("clip"), metavar="MAX",
                   help="clip the gradient to this global norm")
    g.add_argument("--clip-mode", choices=("global_norm", "value", "per_tensor_norm"),
                   help="how --clip clips (default global_norm)")
    g.add_argument("--bptt", type=_train_type("bptt"), metavar="K",
                   help="truncate backpropagation through time to windows of K steps")
    g.add_argument("--stateful", action=argparse.BooleanOptionalAction, default=None,
                   help="carry the final states of a batch into the next (reset every epoch)")
    g.add_argument("--val-every", type=_train_type("val_every"), metavar="N",
                   help="steps between validations (default: every epoch, or 10%% of steps)")
    g.add_argument("--patience", type=_train_type("patience"), metavar="N",
                   help="stop after N validations without improvement")
    g.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    g.add_argument("--seed", type=_train_type("seed"), help="seed of data, split, order and init "
                                                    "(default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="output folder (default runs/<model>)")
    g.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="save a checkpoint every N steps (one is always saved at the end)")
    g.add_argument("--keep", type=_positive_int, metavar="N",
                   help="checkpoints to keep (default 3)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that already holds a run")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="BLAS threads (needs threadpoolctl)")
    g.add_argument("--debug-nans", action="store_true",
                   help="compile with NaN checks after every op (slow; names the first one)")
    _add_recompute(g)
    g.add_argument("--poison", action="store_true",
                   help="fill every buffer with NaN before its first write; the results "
                        "must not change (a check that no memory is read unwritten)")
    g.add_argument("--ignore-memory-limit", action="store_true",
                   help="train even when the estimated memory of a step exceeds the "
                        "machine's available memory")
    g.add_argument("--deterministic", action="store_true",
                   help="GPU: no TF32, no CUB/cuTENSOR reductions, for bitwise-repeatable "
                        "runs (the CPU is deterministic already)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_backend(g)


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    evaluate = _optional("convc.runtime.evaluate")
    if evaluate is not None and hasattr(evaluate, "add_eval_arguments"):
        evaluate.add_eval_arguments(p)
        return
    p.add_argument("spec", metavar="FILE", help="the model's .cell file")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or a run folder")
    p.add_argument("--data", default=None, help="the data to evaluate on")


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    bench = _optional("convc.runtime.bench")
    if bench is not None and hasattr(bench, "add_bench_arguments"):
        bench.add_bench_arguments(p)
        return
    p.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="a .cell file to time (default: the built-in set)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write results as JSON")
    _add_backend(p)


COMMANDS = {
    "check": "check a .cell file and print its diagnostics",
    "compile": "compile a model to a Python module (and its IR, DOT, JSON)",
    "graph": "write the compiled graph as DOT, SVG or PNG",
    "fmt": "format a .cell file",
    "summary": "parameters, FLOPs and BPTT memory per cell",
    "train": "train a model and write its run folder",
    "predict": "predict frames with a trained checkpoint",
    "eval": "score a checkpoint's forecasts beside two baselines",
    "gradcheck": "check the generated gradients against finite differences",
    "bench": "time convc's kernels and models",
    "doctor": "describe this installation (for bug reports)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convc", formatter_class=_Formatter,
        description="convc compiles recurrent convolutional networks written in .cell files "
                    "to Python\nmodules with a generated backward pass through time, and "
                    "trains them.",
        epilog="examples:\n"
               "  convc check examples/seed.cell\n"
               "  convc compile examples/seed.cell -o seed_model.py\n"
               "  convc train examples/seed.cell --steps 100 --out runs/seed\n"
               "  convc summary examples/stack.cell\n\n"
               "`convc COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"convc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    def command(name: str, func, description: str = "", epilog: str = ""):
        p = sub.add_parser(name, help=COMMANDS[name], formatter_class=_Formatter,
                           description=description or COMMANDS[name][0].upper()
                           + COMMANDS[name][1:] + ".", epilog=epilog)
        p.set_defaults(func=func)
        return p

    p = command("check", cmd_check,
                "Parse, check and lower every model of FILE. Errors print as\n"
                "file:line:col: error[CODE]: message, with the source line and a caret.\n"
                "Exit status 0 without errors (warnings allowed), 1 with.")
    _add_file(p)
    p.add_argument("--diagnostics-format", choices=("text", "json"), default="text",
                   help="text (gcc-style, on stderr) or json (on stdout)")

    p = command("compile", cmd_compile,
                "Compile a model. Without -o the result goes to stdout; with several\n"
                "--emit kinds, -o OUT.py names OUT.py, OUT.ir, OUT.dot and OUT.json.",
                "example:\n  convc compile examples/seed.cell -o seed_model.py --emit py,ir")
    _add_file(p)
    p.add_argument("-o", "--output", metavar="OUT", help="file to write")
    p.add_argument("--emit", type=_emits, default=["py"], metavar="KINDS",
                   help="comma-separated: py (the module), ir (text dump of the graph), "
                        "dot (Graphviz), json (the graph); default py")
    p.add_argument("--timings", action="store_true",
                   help="print the time of each compiler stage and what the passes changed")
    p.add_argument("--debug-nans", action="store_true",
                   help="generate a NaN/Inf check after every op (raises NonFiniteError)")
    _add_recompute(p)

    p = command("graph", cmd_graph,
                "Write the compiled graph (forward and backward nodes, loops as clusters).\n"
                "SVG, PNG and PDF need Graphviz's `dot` program on PATH.")
    _add_file(p)
    p.add_argument("-o", "--output", metavar="OUT",
                   help="OUT.dot, OUT.svg, OUT.png or OUT.pdf (default: DOT on stdout)")

    p = command("fmt", cmd_fmt, "Format a .cell file; prints the result unless --write or "
                                "--check.")
    _add_file(p, with_model=False)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite FILE in place")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if FILE is not formatted (for CI)")

    p = command("summary", cmd_summary,
                "One row per cell instance and output: output shape per step, parameters,\n"
                "convolution FLOPs, elementwise operations and the activation memory the\n"
                "backward pass keeps, per sample and time step; then that memory for a\n"
                "whole sequence, kept for all steps and with --recompute K.")
    _add_file(p)
    p.add_argument("--frames", type=_positive_int, default=10, metavar="T",
                   help="sequence length of the memory report (default 10)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                   help="batch size of the memory report (default 1)")
    _add_recompute(p)

    p = command("train", cmd_train,
                "Train a model on synthetic or file data. Settings not given here come\n"
                "from the spec's train { ... } block, then from convc's defaults.\n"
                "Writes model.py, log.csv, checkpoints, predictions.png and loss.png to\n"
                "--out. Ctrl-C saves the last completed step; --resume continues it with\n"
                "the same losses, bit for bit, as an uninterrupted run.",
                "examples:\n"
                "  convc train examples/seed.cell --steps 100 --out runs/seed\n"
                "  convc train examples/seed.cell --out runs/seed --resume --steps 300\n"
                "  convc train examples/shi2015_small.cell --data mnist_test_seq.npy")
    _add_train_arguments(p)

    p = command("predict", cmd_predict,
                "Run a trained model on clips and write predictions.npy (N, T, C, H, W,\n"
                "full frames for models that read patches) and predictions.png.\n"
                "Next-frame models predict the next frame at every input step; forecast\n"
                "models predict --steps frames after the input.")
    _add_file(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint (ckpt-*.npz) or a run folder (its newest valid one)")
    p.add_argument("--data", required=True,
                   help="synthetic, synthetic:shapes, sklearn-digits or a .npy/.npz file")
    p.add_argument("--out", default=".", metavar="DIR", help="output folder (default .)")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="frames to predict, forecast models (default: as trained, or 10)")
    p.add_argument("--clips", type=_positive_int, metavar="N",
                   help="sequences to generate (default 8) or keep from a file")
    p.add_argument("--seed", type=_nonneg_int, help="seed of generated data")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="use a checkpoint whose parameters hold NaN or Inf (refused otherwise)")
    _add_backend(p)

    p = command("eval", cmd_eval,
                "Score a checkpoint's forecasts (MSE, MAE, SSIM, PSNR on full frames)\n"
                "beside two baselines: the last input frame and the mean training frame.")
    _add_eval_arguments(p)

    p = command("gradcheck", cmd_gradcheck,
                "Compare the generated BPTT gradients with float64 finite differences\n"
                "along random directions, on a small random batch with poisoned buffers.\n"
                "The step and the limit come from the loss itself: its rounding noise is\n"
                "measured (ECnoise), a step sweep of Richardson-extrapolated central\n"
                "differences keeps the step with the smallest error bound, and a\n"
                "parameter passes when its error is within 3x that bound (its\n"
                "resolution). Steps that cross a kink (relu, hard_sigmoid) are left\n"
                "for smaller ones; a parameter no step resolves is reported as not\n"
                "checked. Exit 0: every parameter agrees; 1: some disagree; 3: none\n"
                "disagrees but some could not be checked.")
    _add_file(p)
    p.add_argument("--bptt", type=_positive_int, metavar="K",
                   help="check the truncated gradient of windows of K steps")
    p.add_argument("--dirs", type=_positive_int, default=2, metavar="N",
                   help="random directions per parameter (default 2)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the parameters, data and directions (default 0)")
    p.add_argument("--batch", type=_positive_int, default=2, metavar="N",
                   help="sequences in the batch (default 2)")
    p.add_argument("--frames", type=_positive_int, default=4, metavar="T",
                   help="input steps (default 4)")
    p.add_argument("--frames-out", type=_positive_int, default=None, metavar="T",
                   help="target steps of forecast models (default: --frames)")
    p.add_argument("--eps", type=_positive_float, default=None, metavar="H",
                   help="use steps H, H/2, H/4 instead of the sweep")
    p.add_argument("--tolerance", type=_positive_float, default=None, metavar="REL",
                   help="also pass relative errors up to REL (it cannot make the limit "
                        "tighter than the resolution)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the report as JSON")

    p = command("bench", cmd_bench, "Time convc's convolution kernels and compiled models.")
    _add_bench_arguments(p)

    command("doctor", cmd_doctor, "Print versions, BLAS, threads and GPU: what to include "
                                  "in a bug report.")
    return parser


def _printable_lines(text: str) -> str:
    """An error message with control characters escaped (a file name or a value from a
    file may hold them), its own line breaks kept."""
    from convc.spec.diagnostics import printable

    return "\n".join(printable(line) for line in text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 error, 2 usage, 130 Ctrl-C,
    143 SIGTERM during training)."""
    from convc.spec.diagnostics import CellError, format_diagnostics

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except CellError as exc:
        print(format_diagnostics(exc.diagnostics), file=sys.stderr)
        return 1
    except ConvcError as exc:
        print(f"convc: error: {_printable_lines(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # 128 + the signal, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM
        # (convc.runtime.train.TrainingInterrupted carries which one it was).
        print(f"convc: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except BrokenPipeError:
        # `convc compile x.cell | head`: the reader left; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"convc: error: {_printable_lines(f'{name}{exc.strerror or exc}')}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
