"""The core CLI as a user runs it: subprocesses, exit codes, messages, no partial output."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_presets_table():
    r = run("tinyllama", "presets")
    assert r.returncode == 0
    assert "tinyllama-1.1b" in r.stdout and "1,100,048,384" in r.stdout and "6,738,415,616" in r.stdout


def test_init_then_inspect_with_transformers(tmp_path):
    out = tmp_path / "init"
    r = run("tinyllama", "init", "--preset", "tinyllama-debug", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "4,188,480 parameters" in r.stdout
    r = run("tinyllama", "inspect", str(out), "--verify-hf")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |Δlogit|" in r.stdout and "(OK" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["inspect", "{tmp}/missing"], "missing: no such file or directory"),
    (["inspect", "{tmp}"], "no config.json"),
    (["init", "--out", "{tmp}/no/such/parent/x"], "output folder does not exist"),
])
def test_errors_are_one_clear_line(tmp_path, argv, message):
    r = run("tinyllama", *[a.format(tmp=tmp_path) for a in argv])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_is_an_argparse_error(tmp_path):
    r = run("tinyllama", "init", "--preset", "gpt-5", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not (tmp_path / "x").exists()


def test_tokenizer_cli():
    r = run("tinyllama", "tokenizer", "encode", "Hello world")
    assert r.returncode == 0 and r.stdout.strip() == "[1, 15043, 3186]"
    r = run("tinyllama", "tokenizer", "build", "--gguf", "/nonexistent.gguf", "--out", "/tmp/never-written-tok")
    assert r.returncode == 2 and "GGUF vocabulary file not found" in r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["tokenizer", "build", "--help"], ["init", "--help"]])
def test_help_explains(argv):
    r = run("tinyllama", *argv)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_every_stage_is_reachable_from_the_front_door():
    """`tinyllama STAGE --help` reaches each stage's own parser (lifecycle.py: the console
    script), and an unknown command is a clear error."""
    import lifecycle

    for command in lifecycle.STAGES:
        r = subprocess.run([sys.executable, "-m", "lifecycle", command, "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        assert r.returncode == 0, (command, r.stderr[-500:])
        assert "usage:" in r.stdout, command
    r = subprocess.run([sys.executable, "-m", "lifecycle", "train-everything"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "unknown command 'train-everything'" in r.stderr and "pretrain" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lifecycle"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and all(name in r.stdout for name in lifecycle.STAGES)
