"""Twisted finds the referral-proxy plugin after ``pip install .`` and ``pip install -e .``."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FIND = (
    "from twisted.plugin import getPlugins\n"
    "from twisted.application.service import IServiceMaker\n"
    "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
)


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_plugin_found_after_install(tmp_path, editable):
    # A copy of the source tree, so that the checkout (and its sys.path) cannot help.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache", "dropin.cache", ".hypothesis"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Twisted & co. come from this interpreter's site-packages, added as a plain path: the
    # .pth files there (among them the checkout's own editable install) are NOT processed.
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "zz_system_libs.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The build backend (setuptools) is fetched into pip's usual isolated build environment.
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
    cmd += ["-e", str(src)] if editable else [str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(python), "-c", FIND], capture_output=True, text=True, timeout=120, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "referral-proxy" in result.stdout, result.stdout + result.stderr
    # The plugin module the venv imports is the installed one (or the editable source), not the checkout's.
    where = subprocess.run(
        [str(python), "-c", "import referral_proxy; print(referral_proxy.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=elsewhere,
    ).stdout
    assert where.startswith(str(src if editable else env_dir)), where
