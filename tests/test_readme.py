"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path: Path) -> None:
    text = README.read_text()
    match = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert match, "README has no quickstart block"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            exec(compile(match.group(1), str(README), "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model.safetensors").exists()
