"""`make compat`'s checks of the torch pin, run with the compat venv's Python.

1. The zerockpt installed here declares ``torch==<this torch's minor>.*``.
2. A zerockpt extension built for another torch (FOREIGN_PYTHON's editable build) refuses to
   load under this torch with one clear ImportError naming both versions: never an
   undefined-symbol trace or a crash.

Usage: python tools/check_torch_pin.py FOREIGN_PYTHON
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    wanted = f"torch=={major}.{minor}.*"
    requires = importlib.metadata.requires("zerockpt") or []
    if wanted not in [r.replace(" ", "") for r in requires]:
        print(f"FAIL: zerockpt requires {requires}, expected {wanted}")
        return 1
    print(f"ok: the wheel built here requires {wanted}")

    foreign = subprocess.run(
        [sys.argv[1], "-c", "import zerockpt._C as c, os; print(os.path.dirname(c.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    source = Path(__file__).resolve().parents[1] / "python" / "zerockpt"
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "zerockpt"
        shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
        for built in Path(foreign).iterdir():
            if built.name.startswith("_C.") or built.name == "_build_info.py":
                shutil.copy(built, package / built.name)
        run = subprocess.run(
            [sys.executable, "-c", "import zerockpt"], cwd=tmp, capture_output=True, text=True
        )
    last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
    if run.returncode != 1 or not last.startswith("ImportError: zerockpt was compiled against"):
        print(f"FAIL: importing the foreign build gave rc={run.returncode}:\n{run.stderr}")
        return 1
    if torch.__version__ not in last:
        print(f"FAIL: the message does not name torch {torch.__version__}: {last}")
        return 1
    print(f"ok: a build for another torch refuses to load: {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
