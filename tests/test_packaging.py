"""The wheel ships every module of passes/ and models/ under onnxpress.*, and `import passes` is refused."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = (("passes", "onnxpress/passes"), ("models", "onnxpress/models"), ("onnxpress", "onnxpress"))


def test_every_package_folder_is_listed_in_pyproject():
    """setuptools ships only the packages pyproject lists: a new sub-package must be added there (the
    wheel test below is slow; this one catches the omission in the fast suite)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder, package in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            dotted = ".".join([*package.split("/"), *init.parent.relative_to(ROOT / folder).parts])
            assert dotted in listed, f"{init.parent} ({dotted}) is not in pyproject's [tool.setuptools] packages"


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("onnxpress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in FOLDERS:
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{source.relative_to(ROOT / folder).as_posix()}" in names, f"{source} missing from the wheel"
    for data in (ROOT / "models" / "data").glob("*.txt"):
        assert f"onnxpress/models/data/{data.name}" in names


def test_second_copy_of_passes_is_refused():
    proc = subprocess.run([sys.executable, "-c", "import passes"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "import onnxpress.passes, not 'passes'" in proc.stderr
