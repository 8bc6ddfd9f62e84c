"""The `convc` command line: every subcommand's help, exit statuses, and what each writes.

Commands run in-process through `main([...])`; one test runs the installed
console script in a subprocess to check the entry point itself.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc
import convc.api as api
from convc import cli
from convc.errors import ConvcError

ROOT = Path(__file__).resolve().parents[1]
SEED = str(ROOT / "examples" / "seed.cell")
SUBCOMMANDS = sorted(cli.COMMANDS)

BAD_SYNTAX = """model broken {
    input x: [1, 8, 8]
    target y: [1, 8, 8]
    h = = x
}
"""


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: convc {command}")
    assert len(out.splitlines()) > 4


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in SUBCOMMANDS:
        assert command in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"convc {convc.__version__}"


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["train"],
    ["compile", SEED, "--emit", "bogus"],
    ["train", SEED, "--steps", "0"],
    ["train", SEED, "--steps", "3", "--epochs", "1"],
    ["gradcheck", SEED, "--dirs", "many"],
    ["compile", SEED, "--recompute", "0"],
    ["summary", SEED, "--frames", "-1"],
    ["bench", "--recompute", "0"],
    ["bench", "--steps", "0"],
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "error:" in err and "Traceback" not in err


def test_check_a_good_file(capsys):
    code, out, err = run(capsys, "check", SEED)
    assert code == 0
    assert out.strip() == f"{SEED}: ok (no problems)"


def test_check_a_malformed_file_prints_gcc_style_diagnostics(capsys, tmp_path):
    bad = tmp_path / "broken.cell"
    bad.write_text(BAD_SYNTAX)
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    assert f"{bad}:4:" in err and "error[" in err
    assert "^" in err and "Traceback" not in err


def test_check_json_diagnostics_parse(capsys, tmp_path):
    bad = tmp_path / "broken.cell"
    bad.write_text(BAD_SYNTAX)
    code, out, _ = run(capsys, "check", str(bad), "--diagnostics-format=json")
    assert code == 1
    report = json.loads(out)
    assert report["errors"] >= 1
    first = report["diagnostics"][0]
    assert first["line"] == 4 and first["severity"] == "error" and first["code"].startswith("E")
    code, out, _ = run(capsys, "check", SEED, "--diagnostics-format", "json")
    assert code == 0 and json.loads(out)["errors"] == 0


def test_compile_writes_an_importable_module(capsys, tmp_path):
    target = tmp_path / "seed_model.py"
    code, _, err = run(capsys, "compile", SEED, "-o", str(target))
    assert code == 0 and target.exists()
    mod = api.import_generated(target)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 3, 1, 16, 16)).astype(np.float32)
    loss, grads, _ = mod.loss_and_grad(mod.init_params(seed=0), {"x": x}, {"y": x})
    assert math.isfinite(loss) and sorted(grads) == sorted(mod.MODEL["params"])


def test_compile_vjp_writes_a_module_with_the_vector_jacobian_product(capsys, tmp_path):
    target = tmp_path / "seed_vjp.py"
    code, _, _ = run(capsys, "compile", SEED, "--vjp", "-o", str(target))
    assert code == 0
    mod = api.import_generated(target)
    params = mod.init_params(seed=0, dtype="float64")
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 1, 16, 16))
    out, _ = mod.forward(params, {"x": x})
    param_cts, input_cts, state_cts = mod.vjp(params, {"x": x}, {"pred": np.ones_like(out["pred"])})
    assert sorted(param_cts) == sorted(params) and input_cts["x"].shape == x.shape
    assert sorted(state_cts) == sorted(mod.MODEL["states"])
    plain = tmp_path / "seed.py"
    assert run(capsys, "compile", SEED, "-o", str(plain))[0] == 0
    with pytest.raises(ConvcError, match="--vjp"):
        api.import_generated(plain).vjp(params, {"x": x}, {})


def test_compile_emits_ir_dot_and_json_next_to_the_output(capsys, tmp_path):
    target = tmp_path / "seed.py"
    code, _, err = run(capsys, "compile", SEED, "-o", str(target), "--emit", "py,ir,dot,json",
                       "--timings")
    assert code == 0
    assert (tmp_path / "seed.py").read_text().startswith('"""seed: generated by convc')
    assert "lstm_W" in (tmp_path / "seed.ir").read_text()
    assert (tmp_path / "seed.dot").read_text().startswith("digraph")
    assert "nodes" in json.loads((tmp_path / "seed.json").read_text())
    assert "timings:" in err and "codegen" in err and "passes" in err


def test_compile_to_stdout(capsys):
    code, out, _ = run(capsys, "compile", SEED, "--emit", "ir")
    assert code == 0 and "conv(" in out


def test_graph_writes_dot_and_explains_missing_graphviz(capsys, tmp_path, monkeypatch):
    code, _, _ = run(capsys, "graph", SEED, "-o", str(tmp_path / "g.dot"))
    assert code == 0 and (tmp_path / "g.dot").read_text().startswith("digraph")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, err = run(capsys, "graph", SEED, "-o", str(tmp_path / "g.svg"))
    assert code == 1 and "Graphviz" in err and "g.dot" in err


# Graphviz's X11 colour names (lib/common/color_names; the default colour scheme),
# without the numbered variants (name1 ... name4, gray0 ... gray100) matched below.
GRAPHVIZ_X11 = set("""
aliceblue antiquewhite aquamarine azure beige bisque black blanchedalmond blue blueviolet
brown burlywood cadetblue chartreuse chocolate coral cornflowerblue cornsilk crimson cyan
darkgoldenrod darkgreen darkkhaki darkolivegreen darkorange darkorchid darksalmon
darkseagreen darkslateblue darkslategray darkslategrey darkturquoise darkviolet deeppink
deepskyblue dimgray dimgrey dodgerblue firebrick floralwhite forestgreen gainsboro
ghostwhite gold goldenrod gray green greenyellow grey honeydew hotpink indianred indigo
ivory khaki lavender lavenderblush lawngreen lemonchiffon lightblue lightcoral lightcyan
lightgoldenrod lightgoldenrodyellow lightgray lightgrey lightpink lightsalmon
lightseagreen lightskyblue lightslateblue lightslategray lightslategrey lightsteelblue
lightyellow limegreen linen magenta maroon mediumaquamarine mediumblue mediumorchid
mediumpurple mediumseagreen mediumslateblue mediumspringgreen mediumturquoise
mediumvioletred midnightblue mintcream mistyrose moccasin navajowhite navy navyblue
oldlace olivedrab orange orangered orchid palegoldenrod palegreen paleturquoise
palevioletred papayawhip peachpuff peru pink plum powderblue purple red rosybrown
royalblue saddlebrown salmon sandybrown seagreen seashell sienna skyblue slateblue
slategray slategrey snow springgreen steelblue tan thistle tomato transparent turquoise
violet violetred wheat white whitesmoke yellow yellowgreen
""".split())


def _graphviz_colour_ok(value: str) -> bool:
    """Graphviz's colour syntax: #rrggbb or #rrggbbaa, or a name of the X11 scheme."""
    import re

    if value.startswith("#"):
        return re.fullmatch(r"#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?", value) is not None
    name = value.lower()
    numbered = re.fullmatch(r"([a-z]+?)([1-4])", name)
    grey = re.fullmatch(r"gr[ae]y(\d{1,3})", name)
    return (name in GRAPHVIZ_X11 or (numbered is not None and numbered.group(1) in GRAPHVIZ_X11)
            or (grey is not None and int(grey.group(1)) <= 100))


@pytest.mark.parametrize("spec", ["seed.cell", "encoder_forecaster.cell"])
def test_graph_emits_only_colours_graphviz_knows(capsys, spec):
    import re

    assert not _graphviz_colour_ok("#eef") and _graphviz_colour_ok("#eeeeff")
    code, dot, _ = run(capsys, "graph", str(ROOT / "examples" / spec))
    assert code == 0
    colours = re.findall(r'\b(?:color|fillcolor|fontcolor|bgcolor|pencolor)="([^"]*)"', dot)
    # parameters (filled), backward nodes and state edges each carry one
    assert len(set(colours)) >= 3, colours
    assert [c for c in colours if not _graphviz_colour_ok(c)] == []
    # no colour given without quotes either, where the regex above would miss it
    assert not re.search(r"color=[^\"]", dot)


def _fake_dot(tmp_path: Path, body: str) -> Path:
    """A `dot` on PATH that needs no Graphviz: a shell script doing `body`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "dot"
    exe.write_text("#!/bin/sh\ncat > \"$(dirname \"$0\")/input.dot\"\n" + body)
    exe.chmod(0o755)
    return bindir


@pytest.mark.skipif(sys.platform == "win32", reason="the fake dot is a shell script")
def test_graph_passes_graphviz_warnings_on(capsys, tmp_path, monkeypatch):
    bindir = _fake_dot(tmp_path, "echo 'Warning: #eef is not a known color.' >&2\n"
                                 "echo '<svg>fake</svg>'\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "g.svg"
    code, _, err = run(capsys, "graph", SEED, "-o", str(out))
    assert code == 0, err
    assert out.read_text() == "<svg>fake</svg>\n"
    assert (bindir / "input.dot").read_text().startswith('digraph "seed"')
    assert "graphviz: Warning: #eef is not a known color." in err.splitlines()
    assert f"wrote {out}" in err


@pytest.mark.skipif(sys.platform == "win32", reason="the fake dot is a shell script")
def test_graph_reports_a_failing_dot_with_its_messages(capsys, tmp_path, monkeypatch):
    bindir = _fake_dot(tmp_path, "echo 'Error: <stdin>: syntax error in line 1' >&2\nexit 3\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "g.png"
    code, _, err = run(capsys, "graph", SEED, "-o", str(out))
    assert code == 1 and not out.exists()
    assert "dot" in err and "exit 3" in err and "syntax error in line 1" in err
    # a dot that exits 0 but draws nothing is an error too, not an empty picture
    (bindir / "dot").write_text("#!/bin/sh\ncat > /dev/null\n")
    code, _, err = run(capsys, "graph", SEED, "-o", str(out))
    assert code == 1 and not out.exists() and "drew nothing" in err


def test_fmt_check_on_an_example(capsys):
    pytest.importorskip("convc.spec.format", reason="convc.spec.format is not written yet")
    from convc.spec.format import format_source

    text = Path(SEED).read_text()
    code, out, err = run(capsys, "fmt", SEED, "--check")
    assert code == (0 if format_source(text, SEED) == text else 1)
    code, out, _ = run(capsys, "fmt", SEED)
    assert code == 0 and out == format_source(text, SEED)


def test_train_then_predict(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", SEED, "--steps", "3", "--clips", "8",
                            "--frames-in", "4", "--out", str(out), "-q")
    assert code == 0, err
    for name in ("log.csv", "model.py", "ckpt-00000003.npz", "predictions.png", "loss.png"):
        assert (out / name).exists(), name
    assert "trained 3 steps" in stdout and str(out) in stdout
    # The same folder again without --resume is a user error, not a traceback.
    code, _, err = run(capsys, "train", SEED, "--steps", "3", "--out", str(out), "-q")
    assert code == 1 and err.startswith("convc: error:") and "--resume" in err

    pred_dir = tmp_path / "pred"
    code, stdout, err = run(capsys, "predict", SEED, "--checkpoint", str(out),
                            "--data", "synthetic", "--clips", "3", "--out", str(pred_dir))
    assert code == 0, err
    preds = np.load(pred_dir / "predictions.npy")
    assert preds.shape == (3, 4, 1, 16, 16) and preds.dtype == np.float32
    assert (pred_dir / "predictions.png").exists()


def test_summary_total_params_is_the_sum_of_parameter_sizes(capsys):
    code, out, _ = run(capsys, "summary", SEED)
    assert code == 0
    total_line = next(line for line in out.splitlines() if line.startswith("Total"))
    total = int(total_line.split()[1].replace(",", ""))
    mod = api.load(SEED)
    assert total == sum(int(np.prod(p["shape"])) for p in mod.MODEL["params"].values())
    assert "lstm" in out and "SeedLSTM" in out


def test_gradcheck_passes_on_the_seed_example(capsys):
    code, out, err = run(capsys, "gradcheck", SEED, "--frames", "3")
    assert code == 0, out + err
    assert "PASS" in out and "lstm.W" in out


def test_doctor_runs(capsys):
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and "numpy" in out and "python" in out


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_doctor", interrupted)
    code, _, err = run(capsys, "doctor")
    assert code == 130 and "interrupted" in err


def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).parent / "convc"
    if not script.exists():
        pytest.skip("the convc console script is not installed in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and convc.__version__ in result.stdout
    bad = tmp_path / "broken.cell"
    bad.write_text(BAD_SYNTAX)
    result = subprocess.run([str(script), "check", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "error[" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "convc", "check", SEED],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout


@pytest.mark.parametrize("command", ["check", "fmt", "compile", "graph", "summary", "train",
                                     "gradcheck", "bench"])
def test_every_command_reports_a_missing_file_as_e001(capsys, tmp_path, command):
    missing = str(tmp_path / "nope.cell")
    code, out, err = run(capsys, command, missing)
    assert code == 1 and out == ""
    assert err.splitlines() == [f"{missing}: error[E001]: no such file: {missing}", "1 error"]


@pytest.mark.parametrize("command", [["predict", "--checkpoint", "c.npz", "--data", "synthetic"],
                                     ["eval", "--checkpoint", "c.npz"]])
def test_predict_and_eval_report_a_missing_spec_as_e001(capsys, tmp_path, command):
    missing = str(tmp_path / "nope.cell")
    code, out, err = run(capsys, command[0], missing, *command[1:])
    assert code == 1 and out == ""
    assert err.splitlines() == [f"{missing}: error[E001]: no such file: {missing}", "1 error"]


def test_control_characters_in_an_error_line_are_escaped(capsys, tmp_path):
    spec = tmp_path / "seed.cell"
    spec.write_text(Path(SEED).read_text())
    code, _, err = run(capsys, "compile", str(spec), "-o", str(tmp_path / "x\x1b[2Jy.cell"))
    assert code == 1 and "refusing to write" in err
    assert "\x1b" not in err and "x\\x1b[2Jy.cell" in err



def test_check_json_reports_a_missing_file_on_stdout(capsys, tmp_path):
    missing = str(tmp_path / "nope.cell")
    code, out, _ = run(capsys, "check", missing, "--diagnostics-format", "json")
    report = json.loads(out)
    assert code == 1 and report["errors"] == 1
    (d,) = report["diagnostics"]
    assert (d["code"], d["file"], d["line"]) == ("E001", missing, 0)


def test_fmt_of_a_file_that_is_not_utf8_is_e001_as_check_says(capsys, tmp_path):
    bad = tmp_path / "latin1.cell"
    bad.write_bytes(b"# caf\xe9\ncell A() {\n    input x\n    output x\n}\n")
    answers = []
    for command in ("check", "fmt"):
        code, out, err = run(capsys, command, str(bad))
        answers.append((code, err))
    assert answers[0] == answers[1]
    assert answers[0][0] == 1 and "error[E001]" in answers[0][1] and "not UTF-8" in answers[0][1]


def test_check_escapes_control_bytes_in_the_file_name(capsys, tmp_path):
    name = tmp_path / "a\x1b[31m\x07.cell"
    name.write_text(Path(SEED).read_text())
    code, out, _ = run(capsys, "check", str(name))
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "a\\x1b[31m\\x07.cell: ok" in out


# ---------------------------------------------------------------------------
# Every numeric option of every command comes from the one settings schema
# ---------------------------------------------------------------------------


def _subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _numeric_options():
    for name, sub in sorted(_subcommands().items()):
        base = [name]
        for action in sub._actions:
            if not action.option_strings and action.nargs is None:
                base.append("x.cell")
            elif action.option_strings and action.required:
                base += [action.option_strings[0], "x"]
        for action in sub._actions:
            if action.option_strings and getattr(action.type, "setting", None) is not None:
                yield name, base, action


def _bad_values(setting):
    if setting.kind is int:
        bad = ["1.5", "x", "1" + "0" * 400, "nan"]
        if setting.low is not None:
            bad.append(str(int(setting.low) - 1))
        return bad
    bad = ["nan", "inf", "-inf", "1e999", "x"]
    if setting.low is not None:
        bad.append("-1")
        if setting.open_low:
            bad.append("0")
    if setting.high is not None:
        bad.append(str(setting.high + 1))
    return bad


def test_no_command_parses_a_number_outside_the_schema():
    plain = []
    for name, sub in sorted(_subcommands().items()):
        for action in sub._actions:
            if action.type in (int, float):
                plain.append(f"{name} {action.option_strings[0]}")
    assert plain == []
    options = {(name, a.option_strings[0]) for name, _, a in _numeric_options()}
    # the options issue reports named, and one of each kind, are there
    assert {("eval", "--batch-size"), ("eval", "--frames-in"), ("eval", "--clips"),
            ("train", "--lr"), ("train", "--val-fraction"), ("bench", "--min-time"),
            ("gradcheck", "--dirs"), ("summary", "--frames")} <= options


@pytest.mark.parametrize("name,base,action", list(_numeric_options()),
                         ids=lambda v: v if isinstance(v, str) else
                         getattr(v, "dest", None) or "")
def test_a_bad_number_is_a_usage_error_in_every_command(capsys, name, base, action):
    option = action.option_strings[0]
    for bad in _bad_values(action.type.setting):
        code, out, err = run(capsys, *base, option, bad)
        assert code == 2, (name, option, bad, err)
        assert option in err and "expected" in err and "Traceback" not in err
    good = {int: "1", float: "0.5"}[action.type.setting.kind]
    args = cli.build_parser().parse_args([*base, option, good])
    assert getattr(args, action.dest) == action.type.setting.parse(good)


def test_train_and_gradcheck_refuse_a_model_without_a_loss(capsys, tmp_path):
    spec = tmp_path / "no_loss.cell"
    spec.write_text("import std\n\nmodel m {\n    input x: [1, 8, 8]\n"
                    "    lstm = ConvLSTM(hidden = 2)\n    h = lstm(x)\n    output h\n}\n")
    assert run(capsys, "compile", str(spec), "--vjp", "-o", str(tmp_path / "m.py"))[0] == 0
    for command in ("train", "gradcheck"):
        args = [command, str(spec)] + (["--out", str(tmp_path / "run")] if command == "train"
                                       else [])
        code, _, err = run(capsys, *args)
        assert code == 1 and "has no loss" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
