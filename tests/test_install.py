"""The install contract: the wheel pins the torch minor it was built against, and importing
zerockpt under another torch is one clear ImportError, never an undefined-symbol trace."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zerockpt

ROOT = Path(__file__).resolve().parents[1]
MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _import_zerockpt(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_metadata_requires_the_torch_minor_it_was_built_against() -> None:
    requires = [r.replace(" ", "") for r in importlib.metadata.requires("zerockpt") or []]
    assert f"torch=={MINOR}.*" in requires
    assert not [r for r in requires if r.startswith("torch") and r != f"torch=={MINOR}.*"]


def test_build_info_names_the_running_torch() -> None:
    from zerockpt import _build_info

    assert torch.__version__ == _build_info.TORCH_VERSION


@pytest.mark.parametrize("other", ["2.99.0", "2.11.0+cu130"])
def test_another_torch_minor_is_one_clear_import_error(other: str) -> None:
    if other.startswith(MINOR + "."):
        pytest.skip("same minor as the running torch")
    run = _import_zerockpt(
        f"import sys, torch; torch.__version__ = {other!r}\n"
        "try:\n"
        "    import zerockpt\n"
        "except ImportError as e:\n"
        "    print('loaded _C:', 'zerockpt._C' in sys.modules); raise\n"
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: zerockpt was compiled against torch")
    assert torch.__version__ in last and other in last
    assert f"torch=={MINOR}.*" in last
    assert "pip install --no-build-isolation" in last
    assert "loaded _C: False" in run.stdout  # refused before the binary was touched


def test_a_binary_that_does_not_link_is_the_same_clear_error(tmp_path: Path) -> None:
    """An extension whose symbols the running torch lacks (what a build for another torch of
    the same minor, or a damaged install, looks like) is reported, not dumped as a dlopen
    trace."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a stand-in extension")
    package = tmp_path / "zerockpt"
    shutil.copytree(
        Path(zerockpt.__file__).parent,
        package,
        ignore=shutil.ignore_patterns("__pycache__", "_C.*"),
    )
    from zerockpt import _build_info  # next to _C, wherever the build installed it

    shutil.copy(_build_info.__file__, package / "_build_info.py")
    source = tmp_path / "c.c"
    source.write_text(
        "extern int zerockpt_missing_torch_symbol(void);\n"
        "int PyInit__C(void) { return zerockpt_missing_torch_symbol(); }\n"
    )
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    subprocess.run(
        [cc, "-shared", "-fPIC", str(source), "-o", str(package / f"_C{suffix}")], check=True
    )
    run = _import_zerockpt(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import zerockpt\n"
        f"assert zerockpt.__file__.startswith({str(tmp_path)!r}), zerockpt.__file__\n"
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: zerockpt's C++ extension (built against torch")
    assert f"does not load with the installed torch {torch.__version__}" in last
    assert "undefined symbol: zerockpt_missing_torch_symbol" in last
    assert "pip install --no-build-isolation" in last


def _provider():  # tools/torch_requirement.py, as scikit-build-core loads it
    spec = importlib.util.spec_from_file_location(
        "torch_requirement", ROOT / "tools" / "torch_requirement.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_metadata_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = _provider()
    assert provider.dynamic_metadata("dependencies") == [f"torch=={MINOR}.*"]
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu128")
    with pytest.raises(RuntimeError, match=r"needs torch>=2\.11; the installed torch is 2\.10\.1"):
        provider.dynamic_metadata("dependencies")
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: an sdist's range
    assert provider.dynamic_metadata("dependencies") == ["torch>=2.11"]
    with pytest.raises(RuntimeError, match="dependencies"):
        provider.dynamic_metadata("version")
