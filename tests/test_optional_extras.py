"""The integrations (zerockpt.lightning, .transformers, .accelerate) are optional extras.

``import zerockpt`` imports none of their libraries, each module imports its library only when
used (and gets the real one, never itself), and a missing library is an ImportError naming the
extra to install. One fresh interpreter checks all three (each start costs seconds).
"""

from __future__ import annotations

import json

from conftest import run_python

CODE = """
import json, sys
import zerockpt
import zerockpt.accelerate as za
import zerockpt.transformers as zt

report = {"eager": sorted(
    name for name in ("lightning", "pytorch_lightning", "transformers", "accelerate")
    if name in sys.modules
)}
hidden = {"lightning": None, "lightning_fabric": None, "transformers": None, "accelerate": None}
saved = {name: sys.modules.pop(name, None) for name in hidden}
sys.modules.update(hidden)
for name, use in (
    ("lightning", lambda: __import__("zerockpt.lightning")),
    ("transformers", lambda: zt.ZerockptTrainer),
    ("accelerate", lambda: za.save_state(object(), "x")),
):
    try:
        use()
    except ImportError as error:
        report[name] = str(error)
    else:
        report[name] = "no ImportError"
for name in hidden:
    del sys.modules[name]
import accelerate, transformers
report["real"] = [accelerate.__file__, transformers.__file__, "Trainer" in dir(transformers)]
print(json.dumps(report))
"""


def test_optional_libraries_are_lazy_real_and_named_when_missing() -> None:
    result = run_python(CODE)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["eager"] == [], "imported by `import zerockpt` or its integration modules"
    for extra in ("lightning", "transformers", "accelerate"):
        assert f"pip install zerockpt[{extra}]" in report[extra], report[extra]
    accelerate_file, transformers_file, has_trainer = report["real"]
    assert "zerockpt" not in accelerate_file and "zerockpt" not in transformers_file
    assert has_trainer
