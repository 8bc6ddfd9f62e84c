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
from convc.argtypes import argtype
from convc.argtypes import nonneg_int as _nonneg_int
from convc.argtypes import positive_float as _positive_float
from convc.argtypes import positive_int as _positive_int
from convc.errors import ConvcError
from convc.spec.settings import LENGTH, TRAIN

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


def _add_fuse(p) -> None:
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="run each loop's elementwise work in fused C kernels, built for this "
                        "CPU with the system C compiler (the default where `convc doctor` says "
                        "they can be; --no-fuse: the plain NumPy path)")


def _load(args, debug_nans: bool = False, snapshots: bool = False):
    """Compile the command's FILE (and --model) in memory; warnings go to stderr."""
    import convc.api as api

    _require_file(args.file)
    target = (getattr(args, "device", None) or "cpu", getattr(args, "conv", None) or "numpy")
    mod = api.load(args.file, model=getattr(args, "model", None), debug_nans=debug_nans,
                   recompute=getattr(args, "recompute", None), snapshots=snapshots,
                   target=target,  # planned for the backend it will run on
                   vjp=bool(getattr(args, "vjp", False)),
                   fuse=getattr(args, "fuse", None))
    _print_warnings(mod.compiled.warnings)
    return mod


def _require_loss(mod, command: str) -> None:
    """A model without a loss has nothing to train or to check the gradient of."""
    if not mod.MODEL["loss"]:
        raise ConvcError(f"{mod.MODEL['name']} has no loss, so there is nothing to {command}; "
                         "add a `loss` statement, or train it inside another framework "
                         "through its vjp (convc compile --vjp)")


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
    """py, ir, dot, json, or ir@STAGE: the IR after one compiler stage."""
    from convc.compiler.driver import IR_STAGES

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in EMITS and not (
        k.startswith("ir@") and k[3:] in IR_STAGES)]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(unknown) or '(none)'}; choose from {', '.join(EMITS)}, "
            f"or ir@STAGE with STAGE one of {', '.join(IR_STAGES)}")
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
    stages = [k[3:] for k in args.emit if k.startswith("ir@")]
    mod = _load(args, debug_nans=args.debug_nans, snapshots=bool(stages))
    c = mod.compiled
    texts = {"py": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json(),
             **{f"ir@{s}": c.ir_text(s) for s in stages}}
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
            suffix = f"{kind[3:]}.ir" if kind.startswith("ir@") else kind  # OUT.fold.ir
            path = stem.with_name(f"{stem.name}.{suffix}")
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

# The options of `convc train` passed to train() as given: the settings and these.
_RUN_OPTIONS = ("checkpoint_every", "keep", "threads")


def cmd_train(args) -> int:
    from convc.runtime.train import default_run_folder, train

    mod = _load(args, debug_nans=args.debug_nans)
    _require_loss(mod, "train")
    options = {k: getattr(args, k) for k in (*TRAIN, *_RUN_OPTIONS)
               if getattr(args, k) is not None}
    result = train(mod, out=args.out or default_run_folder(mod.MODEL), device=args.device,
                   conv=args.conv, resume=args.resume, overwrite=args.overwrite,
                   progress=False if args.quiet else None,
                   poison=True if args.poison else None, deterministic=args.deterministic,
                   ignore_memory_limit=args.ignore_memory_limit, **options)
    sys.stdout.write(result.report())
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


def cmd_export(args) -> int:
    """A checkpoint's parameters as a .safetensors file (convc.runtime.weights does the
    work; this refuses bad outputs before it and prints what was written)."""
    from convc.runtime import weights
    from convc.runtime.atomic import check_output
    from convc.runtime.predict import load_checkpoint_params

    mod = _load(args)
    out = Path(args.output)
    check_output(out, (*_inputs(mod), args.checkpoint))
    if not args.overwrite and os.path.lexists(out):
        raise ConvcError(f"refusing to replace {out}: it exists (--overwrite replaces it)")
    weights.require_safetensors()
    params, meta, where = load_checkpoint_params(args.checkpoint, mod.MODEL,
                                                 allow_nonfinite=args.allow_nonfinite)
    check_output(out, (*_inputs(mod), where))
    step = meta.get("step")
    path = weights.save_params(params, out, mod, overwrite=args.overwrite,
                               metadata={"checkpoint": where.name, "step": str(step)})
    print(f"wrote {path}: {len(params)} parameters of model {mod.MODEL['name']} from {where} "
          f"(step {step})")
    return 0


# ---------------------------------------------------------------------------
# gradcheck, doctor, eval, bench
# ---------------------------------------------------------------------------


def cmd_gradcheck(args) -> int:
    """Float64 finite differences along random directions against the generated BPTT."""
    import json

    from convc.runtime.gradcheck import format_report, gradcheck

    mod = _load(args)
    _require_loss(mod, "gradcheck")
    if args.json:  # refuse a bad output name before the check runs
        from convc.runtime.atomic import check_output

        check_output(Path(args.json), _inputs(mod))
    report = gradcheck(mod, batch=args.batch, frames=args.frames, frames_out=args.frames_out,
                       seed=args.seed, dirs=args.dirs, bptt=args.bptt, eps=args.eps,
                       tolerance=args.tolerance)
    sys.stdout.write(format_report(report, dirs=args.dirs, eps=args.eps))
    if args.json:
        _write(Path(args.json), json.dumps(report.to_json(), indent=1) + "\n", mod)
    return report.exit_status


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
    # the choices are the backend registry's (runtime/backend.py: no CuPy or Chainer import)
    from convc.runtime.backend import DEVICES, backend_names

    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (NumPy) or gpu (CuPy); default cpu")
    p.add_argument("--conv", choices=backend_names(), default="numpy",
                   help="convolution: numpy (convc's own im2col+GEMM, the default), chainer "
                        "(Chainer's), reference (the direct definition, slow), onednn (oneDNN's "
                        "float32 convolutions where they win, convc[onednn]; docs/compiler.md), "
                        "or another registered backend")


# The groups of `convc train --help` the settings are listed in (Setting.group).
_SETTING_GROUPS = {"data": "data",
                   "optimisation": "optimisation (defaults: the spec's train block, then "
                                   "built-in)",
                   "distributed": "distributed (docs/distributed.md)"}


def _add_setting(g, name: str) -> None:
    """The option of training setting `name` (`--batch-size` for batch_size), made
    from its entry in the schema: its type or choices, metavar and help."""
    setting = TRAIN[name]
    flag = "--" + name.replace("_", "-")
    help = setting.explain().replace("%", "%%")  # argparse formats help with %
    if setting.kind is bool:
        g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif setting.kind is str and setting.choices and not setting.options:
        g.add_argument(flag, choices=setting.choices, help=help)
    elif setting.kind is str:
        g.add_argument(flag, metavar=setting.metavar, help=help)
    else:
        g.add_argument(flag, type=argtype(setting), metavar=setting.metavar, help=help)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    for group, title in _SETTING_GROUPS.items():
        g = p.add_argument_group(title)
        names = [name for name, setting in TRAIN.items() if setting.group == group]
        length = g.add_mutually_exclusive_group() if set(LENGTH) & set(names) else None
        for name in names:
            _add_setting(length if name in LENGTH else g, name)  # steps or epochs
    _add_run_arguments(p.add_argument_group("run"))


def _add_run_arguments(g) -> None:
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
    "export": "write a checkpoint's parameters as a .safetensors file",
    "gradcheck": "check the generated gradients against finite differences",
    "bench": "time convc's kernels and models",
    "doctor": "describe this installation (for bug reports)",
}


def _subcommand(sub, name: str, func, description: str = "", epilog: str = ""):
    """The parser of command `name`, run by `func`; described as COMMANDS says
    unless `description` says more."""
    p = sub.add_parser(name, help=COMMANDS[name], formatter_class=_Formatter,
                       description=description or COMMANDS[name][0].upper()
                       + COMMANDS[name][1:] + ".", epilog=epilog)
    p.set_defaults(func=func)
    return p


def _check_parsers(sub) -> None:
    """check, compile, graph and fmt: the commands that read a spec and write text."""
    p = _subcommand(sub, "check", cmd_check,
                    "Parse, check and lower every model of FILE. Errors print as\n"
                    "file:line:col: error[CODE]: message, with the source line and a caret.\n"
                    "Exit status 0 without errors (warnings allowed), 1 with.")
    _add_file(p)
    p.add_argument("--diagnostics-format", choices=("text", "json"), default="text",
                   help="text (gcc-style, on stderr) or json (on stdout)")

    p = _subcommand(sub, "compile", cmd_compile,
                    "Compile a model. Without -o the result goes to stdout; with several\n"
                    "--emit kinds, -o OUT.py names OUT.py, OUT.ir, OUT.dot and OUT.json.",
                    "example:\n  convc compile examples/seed.cell -o seed_model.py --emit py,ir")
    _add_file(p)
    p.add_argument("-o", "--output", metavar="OUT", help="file to write")
    p.add_argument("--emit", type=_emits, default=["py"], metavar="KINDS",
                   help="comma-separated: py (the module), ir (text dump of the graph), "
                        "ir@STAGE (the graph after one compiler stage: lower, fold, "
                        "fuse_bce_logits, cse, dce, shapes, fold_zero_channels, autodiff, "
                        "loop_rewrites, schedule; several -o files are OUT.STAGE.ir), "
                        "dot (Graphviz), json (the graph); default py")
    p.add_argument("--timings", action="store_true",
                   help="print the time of each compiler stage and what the passes changed")
    p.add_argument("--debug-nans", action="store_true",
                   help="generate a NaN/Inf check after every op (raises NonFiniteError)")
    p.add_argument("--vjp", action="store_true",
                   help="also generate vjp() and vjp_start(), the vector-Jacobian product of "
                        "the outputs, for other frameworks' autograd (docs/compiler.md)")
    _add_fuse(p)
    _add_recompute(p)

    p = _subcommand(sub, "graph", cmd_graph,
                    "Write the compiled graph (forward and backward nodes, loops as "
                    "clusters).\nSVG, PNG and PDF need Graphviz's `dot` program on PATH.")
    _add_file(p)
    p.add_argument("-o", "--output", metavar="OUT",
                   help="OUT.dot, OUT.svg, OUT.png or OUT.pdf (default: DOT on stdout)")

    p = _subcommand(sub, "fmt", cmd_fmt, "Format a .cell file; prints the result unless "
                                         "--write or --check.")
    _add_file(p, with_model=False)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite FILE in place")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if FILE is not formatted (for CI)")


def _summary_parser(sub) -> None:
    p = _subcommand(sub, "summary", cmd_summary,
                    "One row per cell instance and output: output shape per step, "
                    "parameters,\nconvolution FLOPs, elementwise operations and the "
                    "activation memory the\nbackward pass keeps, per sample and time step; "
                    "then that memory for a\nwhole sequence, kept for all steps and with "
                    "--recompute K.")
    _add_file(p)
    p.add_argument("--frames", type=_positive_int, default=10, metavar="T",
                   help="sequence length of the memory report (default 10)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                   help="batch size of the memory report (default 1)")
    _add_recompute(p)


def _train_parsers(sub) -> None:
    """train, predict and eval: the commands of a training run."""
    p = _subcommand(sub, "train", cmd_train,
                    "Train a model on synthetic or file data. Settings not given here come\n"
                    "from the spec's train { ... } block, then from convc's defaults.\n"
                    "Writes model.py, log.csv, checkpoints, predictions.png and loss.png to\n"
                    "--out. Ctrl-C saves the last completed step; --resume continues it "
                    "with\nthe same losses, bit for bit, as an uninterrupted run.",
                    "examples:\n"
                    "  convc train examples/seed.cell --steps 100 --out runs/seed\n"
                    "  convc train examples/seed.cell --out runs/seed --resume --steps 300\n"
                    "  convc train examples/shi2015_small.cell --data mnist_test_seq.npy")
    _add_train_arguments(p)

    p = _subcommand(sub, "predict", cmd_predict,
                    "Run a trained model on clips and write predictions.npy (N, T, C, H, "
                    "W,\nfull frames for models that read patches) and predictions.png.\n"
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

    p = _subcommand(sub, "eval", cmd_eval,
                    "Score a checkpoint's forecasts (MSE, MAE, SSIM, PSNR on full frames)\n"
                    "beside two baselines: the last input frame and the mean training frame.")
    _add_eval_arguments(p)


def _export_parser(sub) -> None:
    """export: a checkpoint's parameters as .safetensors."""
    p = _subcommand(sub, "export", cmd_export,
                    "Write a checkpoint's parameters as a .safetensors file, named and shaped\n"
                    "as MODEL[\"params\"], with the model's fingerprint in its metadata\n"
                    "(convc.load_params reads it back; docs/weights.md). An existing OUT is\n"
                    "refused unless --overwrite; the write is atomic.",
                    "example:\n  convc export examples/seed.cell --checkpoint runs/seed "
                    "-o seed.safetensors")
    _add_file(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint (ckpt-*.npz) or a run folder (its newest valid one)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export a checkpoint whose parameters hold NaN or Inf (refused "
                        "otherwise)")


def _gradcheck_parser(sub) -> None:
    p = _subcommand(sub, "gradcheck", cmd_gradcheck,
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


def _tool_parsers(sub) -> None:
    """bench and doctor: the commands about convc itself."""
    p = _subcommand(sub, "bench", cmd_bench,
                    "Time convc's convolution kernels and compiled models.")
    _add_bench_arguments(p)
    _subcommand(sub, "doctor", cmd_doctor, "Print versions, BLAS, threads and GPU: what to "
                                           "include in a bug report.")


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
    for add in (_check_parsers, _summary_parser, _train_parsers, _export_parser,
                _gradcheck_parser, _tool_parsers):
        add(sub)
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
