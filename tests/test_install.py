"""pyruntime as a user installs it: a wheel (`pip wheel --no-build-isolation --no-deps .`, not the
editable install the Makefile does) installed into a fresh virtual environment, used from
outside the source tree. Every subcommand's --help and every bench suite's --help run from the
installed package, one bench suite runs at its smallest, and a stand-in distribution owning a
top-level `triton_kernels` (as Triton's own package and PyPI's triton-kernels do) installs
beside it without a shared file, both importable.

The wheel's C++ extension is built by the ordinary build_ext into setup.py's persistent
build/ext-temp, so after `make` (which compiled every translation unit there) ninja only
relinks; from nothing it compiles all of them (minutes). The fresh venv gets the running
environment's packages (torch, triton, numpy, ...) as links, every pyruntime file left out, so
torch is not downloaded again and nothing of the source tree or the editable install is seen."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pyruntime.bench import SUITES
from pyruntime.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = "triton_kernels_stand_in"


def run(cmd: list[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run(cmd, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


def build_wheel(out: Path) -> Path:
    # setuptools copies into build/lib.* without emptying it: a module deleted from the source
    # since the last wheel would still ship. Those folders are only ever wheel staging.
    for stale in glob.glob(str(ROOT / "build" / "lib.*")) + glob.glob(str(ROOT / "build" / "bdist.*")):
        shutil.rmtree(stale, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--use-pep517",
         "-w", str(out), str(ROOT)], cwd=out, timeout=1800)
    [wheel] = out.glob("pyruntime-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A venv whose site-packages links every package of this interpreter's except pyruntime's."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=path).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.name.startswith(("pyruntime", "__editable__")) or entry.name == "__pycache__":
            continue
        if not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(venv python, a work directory outside the source tree, the wheel)."""
    base = tmp_path_factory.mktemp("install")
    wheel = build_wheel(base)
    python = fresh_venv(base / "venv")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=base)
    work = base / "work"
    work.mkdir()
    return python, work, wheel


def test_wheel_holds_only_the_pyruntime_package(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pyruntime", "pyruntime-0.1.0.dist-info"}, names
    kernels = sorted(n.split("/")[-1] for n in names if n.startswith("pyruntime/triton_kernels/"))
    assert kernels == sorted(p.name for p in (ROOT / "triton_kernels").glob("*.py"))
    bench = sorted(n.split("/")[-1] for n in names if n.startswith("pyruntime/bench/"))
    assert bench == sorted(p.name for p in (ROOT / "pyruntime" / "bench").glob("*.py"))
    assert any(n.startswith("pyruntime/_C.") and n.endswith(".so") for n in names)


def test_installed_package_imports_outside_the_source_tree(installed):
    python, work, _ = installed
    # _C first, in a fresh interpreter: the package's import brings torch's libraries in.
    site, *files = run([str(python), "-c", "import pyruntime._C, pyruntime, pyruntime.triton_kernels.matmul as m, "
                        "sysconfig; print(sysconfig.get_paths()['purelib'], pyruntime.__file__, m.__file__)"],
                       cwd=work).stdout.split()
    assert all(Path(f).is_relative_to(site) for f in files), files  # not the checkout, not the editable finder


def test_every_subcommand_and_suite_answers_help_from_the_install(installed):
    python, work, _ = installed
    commands = list(next(a for a in build_parser()._actions if a.dest == "command").choices)
    helps = [["--help"], ["bench", "--help"]] + [[c, "--help"] for c in commands] + \
        [["bench", s, "--help"] for s in SUITES]
    # One interpreter for all of them (each --help: exit 0 with its usage); the console script
    # itself runs in test_a_bench_suite_runs_from_the_install.
    code = ("import contextlib, io\nfrom pyruntime.cli import main\n"
            "from pyruntime.triton_kernels.aot_check import main as aot_check\n"
            f"for argv in {helps!r} + [['aot_check', '--help']]:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n"
            "            rc = aot_check(argv[1:]) if argv[0] == 'aot_check' else main(argv)\n"
            "        except SystemExit as e:\n"
            "            rc = e.code or 0\n"
            "    assert rc == 0 and 'usage:' in buf.getvalue(), (argv, rc, buf.getvalue())\n"
            "    print('ok', ' '.join(argv), '|', ' '.join(buf.getvalue().split()))\n")
    out = run([str(python), "-c", code], cwd=work).stdout.splitlines()
    assert [ln.split(" | ")[0] for ln in out] == ["ok " + " ".join(a) for a in helps] + ["ok aot_check --help"]
    listing = out[1]  # bench --help lists every suite
    assert all(f" {suite} " in listing for suite in SUITES), listing


def test_a_bench_suite_runs_from_the_install(installed):
    python, work, _ = installed
    out = run([str(python.parent / "pyruntime"), "bench", "flat", "--preset", "tiny", "--repeat", "1"],
              cwd=work).stdout
    assert "flat_pack vs cat" in out and "torch.cat" in out and "base/ours" in out, out


def test_a_distribution_owning_top_level_triton_kernels_installs_beside_it(installed, tmp_path):
    python, work, _ = installed
    src = tmp_path / STAND_IN
    (src / "triton_kernels").mkdir(parents=True)
    (src / "triton_kernels" / "__init__.py").write_text('OWNER = "stand-in"\n')
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{STAND_IN}"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["triton_kernels"]\n')
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", str(src)],
        cwd=work)
    code = ("import json, importlib.metadata as md, triton_kernels, pyruntime.triton_kernels.matmul as m, pyruntime._C\n"
            f"files = {{d: [str(f) for f in md.files(d)] for d in ('pyruntime', '{STAND_IN}')}}\n"
            "print(json.dumps([triton_kernels.OWNER, m.__name__, files]))")
    owner, name, files = json.loads(run([str(python), "-c", code], cwd=work).stdout)
    assert (owner, name) == ("stand-in", "pyruntime.triton_kernels.matmul")
    ours, theirs = set(files["pyruntime"]), set(files[STAND_IN])
    assert "triton_kernels/__init__.py" in theirs and "pyruntime/triton_kernels/matmul.py" in ours
    assert not ours & theirs  # no file owned by both: neither install overwrote the other's
