"""The stub's environment: folders named in PAGETRON_STUB_SITE_PACKAGES come first on its import path,
and a numpy 2 there is refused with a clear error (Triton 2.51's stub corrupts BYTES inputs with it)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pagetron.backend.serving.constants import STUB_SITE_ENV
from pagetron.backend.serving.launcher import LaunchError, stub_python_bin

pytestmark = pytest.mark.skipif(
    not Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}").exists(),
    reason="needs the system python of this version (the stub embeds it)",
)


def fake_numpy(folder: Path, version: str) -> Path:
    (folder / "numpy").mkdir(parents=True)
    (folder / "numpy" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return folder


def stub_sys_path(bin_dir: Path) -> list[str]:
    """numpy's file, then sys.path, as the stub sees them (it ignores PYTHONPATH)."""
    code = "import sys, numpy; print(numpy.__file__); print(*sys.path, sep=chr(10))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(bin_dir / "python3"), "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_stub_folders_come_first_then_pythonpath_then_this_environment(tmp_path, monkeypatch):
    first = fake_numpy(tmp_path / "first", "1.26.99")
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.setenv(STUB_SITE_ENV, str(first))
    monkeypatch.setenv("PYTHONPATH", str(extra))
    lines = stub_sys_path(stub_python_bin(tmp_path / "stub_env"))
    numpy_file, path = lines[0], lines[1:]
    assert numpy_file == str(first / "numpy" / "__init__.py")
    ours = sysconfig.get_paths()["purelib"]
    assert path.index(str(first)) < path.index(str(extra)) < path.index(ours)


def test_numpy_2_for_the_stub_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(STUB_SITE_ENV, str(fake_numpy(tmp_path / "np2", "2.1.0")))
    with pytest.raises(LaunchError, match=r"numpy 2\.1\.0.*numpy<2.*PAGETRON_STUB_SITE_PACKAGES"):
        stub_python_bin(tmp_path / "stub_env")
