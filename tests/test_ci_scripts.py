"""The XLA venv scripts on a disk too small for the venv (real bash subprocesses; nothing is installed: the space
check comes before the venv is created). The oracle for "too small" is ``XLA_NEED_MB`` above what ``df`` reports."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.cli_helpers import REPO

TOO_MUCH = str(10**12)  # MB: more than any disk


def _run(script, env_extra, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_CI", "XLA_VENV", "XLA_NEED_MB")}
    return subprocess.run(["bash", str(script)], env={**env, **env_extra}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_xla_env_refuses_a_disk_without_room_in_one_line_before_creating_anything(tmp_path):
    venv = tmp_path / "parent" / "venv"
    out = _run(REPO / "scripts/xla_env.sh", {"XLA_VENV": str(venv), "XLA_NEED_MB": TOO_MUCH})
    assert out.returncode == 75, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the torch 2.9 + torch_xla venv needs about"), out.stderr
    assert f"{TOO_MUCH} MB free at {venv.parent}" in lines[0] and "XLA_VENV" in lines[0]
    assert not venv.exists()  # no half-built venv left behind


def test_ci_step_frees_the_main_venv_then_skips_with_a_notice_and_a_manual_run_fails(tmp_path):
    root = tmp_path / "clone"
    (root / "scripts/ci").mkdir(parents=True)
    shutil.copy(REPO / "scripts/xla_env.sh", root / "scripts/xla_env.sh")
    shutil.copy(REPO / "scripts/ci/xla.sh", root / "scripts/ci/xla.sh")
    (root / ".venv/bin").mkdir(parents=True)
    venv = tmp_path / "xla-venv"
    env = {"XLA_VENV": str(venv), "XLA_NEED_MB": TOO_MUCH, "TMPDIR": str(tmp_path / "tmp")}

    manual = _run(root / "scripts/ci/xla.sh", env, cwd=root)
    assert manual.returncode == 75 and "error: the torch 2.9 + torch_xla venv needs" in manual.stderr
    assert (root / ".venv").is_dir()  # outside CI the main venv is never touched

    ci = _run(root / "scripts/ci/xla.sh", {**env, "XLA_CI": "1"}, cwd=root)
    assert ci.returncode == 0, ci
    assert "removing the main venv" in ci.stdout and "XLA:CPU TESTS NOT RUN" in ci.stdout
    assert not (root / ".venv").exists() and not venv.exists()
    assert "passed" not in ci.stdout  # pytest never started
