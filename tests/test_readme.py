"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = re.search(r"## Quickstart\n(.*?)\n## ", text, re.S)
    assert section, "README has no quickstart section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) >= 2, "README's quickstart has fewer code blocks than expected"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for block in blocks:  # one session: later blocks use earlier names
                if '"cuda' in block and not torch.cuda.is_available():
                    continue  # the GPU example (the CUDA tests cover what it does)
                exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model.safetensors").exists()
