"""The wheel holds what an installed convc needs, and works without the source tree.

The source folders (spec/, compiler/, runtime/, examples/) are mapped onto
convc.* packages by pyproject.toml's package-dir table, and the grammar, the
standard library and the examples are package data: a missing glob there only
shows after installing, which is what these tests do.
"""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folders that are not part of the source: build output, caches, run output.
_NOT_SOURCE = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
               "demo_out", "runs"}


def _ignore_non_source(folder, names):
    ignored = set()
    for name in names:
        path = Path(folder, name)
        if name in _NOT_SOURCE or name.endswith(".egg-info"):
            ignored.add(name)
        elif (path / "pyvenv.cfg").exists():  # a virtual environment, whatever its name
            ignored.add(name)
    return ignored


def _expected_members() -> list[str]:
    members = [
        "convc/__init__.py",
        "convc/cli.py",
        "convc/spec/__init__.py",
        "convc/spec/cell.lark",
        "convc/compiler/__init__.py",
        "convc/runtime/__init__.py",
    ]
    members += [f"convc/spec/stdlib/{p.name}" for p in sorted(ROOT.glob("spec/stdlib/*.cell"))]
    members += [f"convc/examples/{p.name}" for p in sorted(ROOT.glob("examples/*.cell"))]
    return members


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the source tree, so no build/ or
    *.egg-info left in the checkout (stale or not) can reach it."""
    missing = [m for m in ("build", "setuptools", "wheel") if not _importable(m)]
    if missing:
        pytest.fail(f"building the wheel needs {', '.join(missing)} in this environment; "
                    f"`make venv` installs them")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_ignore_non_source)
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out)],
        cwd=source, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("convc-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_contains_packages_grammar_stdlib_and_examples(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_text = zf.read(entry_points).decode()
    missing = [m for m in _expected_members() if m not in names]
    assert not missing, f"missing from {wheel.name}: {missing}"
    assert "[console_scripts]" in entry_text
    scripts = [line.replace(" ", "") for line in entry_text.splitlines()]
    assert "convc=convc.cli:main" in scripts, entry_text


@pytest.mark.slow
def test_wheel_installs_and_finds_its_data(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=120)
    assert (env_dir / "bin" / "convc").exists(), "console script convc was not installed"

    # The wheel was installed without dependencies (no network in tests). Let the
    # new environment import numpy, lark and networkx from this one: a path
    # appended by a .pth file comes after the new site-packages, so convc itself
    # still resolves to the installed wheel, and the .pth files of this
    # environment (the editable install's finder) are not run.
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_convc_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    check = (
        "import importlib.resources, pathlib, sys\n"
        "import convc.spec, convc.cli\n"
        "site = pathlib.Path(sys.argv[1]).resolve()\n"
        "spec_file = pathlib.Path(convc.spec.__file__).resolve()\n"
        "assert spec_file.is_relative_to(site), spec_file\n"
        "assert callable(convc.cli.main)\n"
        "grammar = importlib.resources.files('convc.spec').joinpath('cell.lark').read_text()\n"
        "assert grammar.strip(), 'cell.lark is empty'\n"
        "stdlib = importlib.resources.files('convc.spec').joinpath('stdlib')\n"
        "print(sorted(p.name for p in stdlib.iterdir() if p.name.endswith('.cell')))\n"
        "examples = importlib.resources.files('convc.examples')\n"
        "print(sorted(p.name for p in examples.iterdir() if p.name.endswith('.cell')))\n"
    )
    # -I: ignore PYTHONPATH and the user site; cwd outside the checkout so its
    # convc/ folder cannot shadow the installed package.
    result = subprocess.run([str(python), "-I", "-c", check, str(site_packages)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stdlib_names, example_names = result.stdout.splitlines()
    assert stdlib_names == str(sorted(p.name for p in ROOT.glob("spec/stdlib/*.cell")))
    assert example_names == str(sorted(p.name for p in ROOT.glob("examples/*.cell")))
