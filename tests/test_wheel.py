"""The project as pip installs it: the sdist and the wheel built from it (offline, with the build
backend this environment has), what the wheel puts at the top of site-packages (`tinyllama`,
`tinyllama_lifecycle` and nothing else), and the `tinyllama` command in a fresh virtual environment,
run from a folder outside the checkout. The environment borrows the third-party packages (torch, ...)
from this one's site-packages through a .pth path line, which appends the folder without running the
.pth files in it: the project's own editable install there stays invisible."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME = PYPROJECT["project"]["name"].replace("-", "_")
VERSION = PYPROJECT["project"]["version"]
# installed name -> checkout folder: the core as it is, each stage inside tinyllama_lifecycle/
PLACES = {"tinyllama": "tinyllama", "tinyllama_lifecycle": "tinyllama_lifecycle",
          **{installed.replace(".", "/"): folder for installed, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}}
STAGES = list(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
NOT_INSTALLED = ["bench", "gpu_check", "lifecycle", "tests", "scripts", *STAGES]
THIRD_PARTY = sysconfig.get_paths()["purelib"]      # torch, numpy, ... for the fresh environment


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _source_files() -> list[str]:
    """The working tree as git sees it: tracked and new files, none that .gitignore names."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (to copy its working tree without outputs and caches)")
    out = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def _shipped(files: list[str]) -> dict[str, str]:
    """{path in the wheel: path in the checkout} for every file of the core, the front door and the stages."""
    out = {}
    for f in files:
        for installed, folder in PLACES.items():
            if f.startswith(folder + "/"):
                out[installed + f[len(folder):]] = f
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The sdist built from a copy of the working tree, and the wheel built from the unpacked sdist
    (as `python -m build` does), with no network: no build isolation."""
    for text in PYPROJECT["build-system"]["requires"]:
        req = Requirement(text)
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"building needs {text}, which is not installed here")
        if not req.specifier.contains(have, prereleases=True):
            pytest.skip(f"building needs {text}; {req.name} {have} is installed")
    tmp = tmp_path_factory.mktemp("build")
    files = _source_files()
    src = tmp / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp / "dist"
    dist.mkdir()
    backend = PYPROJECT["build-system"]["build-backend"]
    name = _run([sys.executable, "-c", f"import sys, {backend} as b; print(b.build_sdist(sys.argv[1]))", dist],
                cwd=src).stdout.split()[-1]
    sdist = dist / name
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-w", dist, tmp / "unpacked" / f"{NAME}-{VERSION}"])
    (wheel,) = dist.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "files": files, "src": src}


def test_the_sdist_holds_the_core_the_stages_and_their_data(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"pyproject.toml", "README.md", "PKG-INFO", *_shipped(built["files"]).values()}
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    assert not {n for n in names if n.split("/")[0] in ("bench", "gpu_check")}


def test_the_wheel_holds_two_top_level_packages_and_every_file_they_need(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"{NAME}-{VERSION}.dist-info/entry_points.txt").decode()
    dist_info = f"{NAME}-{VERSION}.dist-info"
    assert {n.split("/")[0] for n in names} == {"tinyllama", "tinyllama_lifecycle", dist_info}
    files = {n for n in names if not n.startswith(dist_info + "/")}
    shipped = _shipped(built["files"])      # package data too: piece_cache.c, the SFT sample, the configs
    assert files == set(shipped), (f"missing from the wheel: {sorted(set(shipped) - files)}; "
                                   f"unexpected: {sorted(files - set(shipped))}")
    assert "tinyllama_lifecycle/pretrain/configs/cpu.yaml" in files and "tinyllama_lifecycle/prepare/piece_cache.c" in files
    assert "tinyllama = tinyllama_lifecycle:main" in entry_points


def _fresh_venv(where: Path, wheel: Path, cwd: Path) -> dict:
    # no PYTHONPATH (the test run's points at the checkout, whose egg-info pip would take for an
    # installed copy of the project and skip the wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "venv", "--without-pip", where], env=env)
    py = where / "bin" / "python"
    # installed before the .pth exists: pip then sees no other copy of the project it might replace
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--no-compile",
          "--disable-pip-version-check", wheel], env=env, cwd=cwd)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip())
    (site / "zz_third_party.pth").write_text(THIRD_PARTY + "\n")
    assert ROOT not in cwd.parents
    return {"py": py, "bin": where / "bin", "site": site, "cwd": cwd, "env": env}


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> dict:
    return _fresh_venv(tmp_path_factory.mktemp("venv") / "venv", built["wheel"], tmp_path_factory.mktemp("elsewhere"))


def _in(venv, *cmd) -> subprocess.CompletedProcess:
    return _run(cmd, cwd=venv["cwd"], env=venv["env"])


def test_only_the_project_is_new_and_no_stage_is_importable_on_its_own(venv):
    probe = ("import importlib.util as u, importlib.metadata as m, sys\n"
             "for name in sys.argv[1:]: print(name, (s := u.find_spec(name)) and s.origin)\n"
             "print('dist', m.distribution('tinyllama-lifecycle').locate_file(''))")
    out = _in(venv, venv["py"], "-c", probe, "tinyllama", "tinyllama_lifecycle", "torch", *NOT_INSTALLED).stdout
    found = dict(line.split(" ", 1) for line in out.splitlines())
    site = str(venv["site"])
    assert found["tinyllama"].startswith(site) and found["tinyllama_lifecycle"].startswith(site), found
    assert found["dist"].startswith(site), found                    # the wheel's metadata, not the checkout's
    assert found["torch"].startswith(THIRD_PARTY), found
    assert all(found[name] == "None" for name in NOT_INSTALLED), found   # `import serve` finds nothing of ours


def test_the_tinyllama_command_runs_the_core_and_the_stages(venv):
    tinyllama = venv["bin"] / "tinyllama"
    out = _in(venv, tinyllama, "--help").stdout
    assert "usage: tinyllama COMMAND" in out and all(f"  {c} " in out for c in ("serve", "complete", "pretrain", "eval"))
    out = _in(venv, tinyllama, "init", "--preset", "tinyllama-debug", "--out", "model").stdout
    assert "4,188,480 parameters" in out and (venv["cwd"] / "model" / "config.json").is_file()
    out = _in(venv, tinyllama, "inspect", "model").stdout
    assert "tinyllama-debug, 4,188,480 parameters" in out
    r = _in(venv, tinyllama, "complete", "--model", "model", "--prompt", "hi", "--max-tokens", "4", "--temperature", "0")
    assert r.stdout.startswith("hi") and "4 generated" in r.stderr, (r.stdout, r.stderr)
    assert "usage:" in _in(venv, tinyllama, "serve", "--help").stdout
    assert "tinyllama-1.1b" in _in(venv, venv["py"], "-m", "tinyllama_lifecycle", "presets").stdout


def test_the_stages_find_their_data_and_each_other_where_the_wheel_put_them(venv):
    """Package data beside the module that reads it; a stage that imports another by its short name."""
    probe = ("import tinyllama_lifecycle as t\n"
             "root = t.make_stages_importable()\n"
             "from prepare.pieces import SOURCE\n"
             "from sft.data import SAMPLE_PATH\n"
             "from pretrain.config import TrainConfig\n"
             "import evaluation.sweep, serve.engine\n"
             "TrainConfig.from_yaml(root / 'pretrain' / 'configs' / 'cpu.yaml')\n"
             "for p in (root, SOURCE, SAMPLE_PATH, serve.engine.__file__, evaluation.sweep.TrainConfig.__module__):\n"
             "    print(p)\n"
             "print(all(p.is_file() and p.stat().st_size for p in (SOURCE, SAMPLE_PATH)))")
    root, source, sample, engine, config, ok = _in(venv, venv["py"], "-c", probe).stdout.splitlines()
    assert root == str(venv["site"] / "tinyllama_lifecycle")
    assert source.startswith(root) and sample.startswith(root) and engine.startswith(root)
    assert config == "pretrain.config" and ok == "True"


def test_an_editable_install_runs_the_checkouts_stages_from_anywhere(built, tmp_path):
    """`make setup` installs the checkout editable: the stages stay where they are (the tests import
    them from the root), `tinyllama` finds them there from any folder, and they are not top level
    for other programs in that environment either."""
    dist = tmp_path / "editable"
    dist.mkdir()
    backend = PYPROJECT["build-system"]["build-backend"]
    name = _run([sys.executable, "-c", f"import sys, {backend} as b; print(b.build_editable(sys.argv[1]))", dist],
                cwd=built["src"]).stdout.split()[-1]
    env = _fresh_venv(tmp_path / "venv", dist / name, tmp_path)
    assert "usage:" in _in(env, env["bin"] / "tinyllama", "complete", "--help").stdout
    probe = ("import importlib.util as u, tinyllama_lifecycle as t\n"
             "print(t.stage_root(), u.find_spec('serve'))")
    assert _in(env, env["py"], "-c", probe).stdout.split() == [str(built["src"]), "None"]
