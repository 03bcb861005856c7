"""`zerockpt bench` (zerockpt.bench): model shapes, options, the table, JSON, the plot."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from zerockpt import bench, benchtools, cli
from zerockpt.cli import UsageError

METHODS = ("zerockpt", "torch", "safetensors")
TINY = ["--params", "2M", "--runs", "1"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = bench.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# --- Sizes and shapes (nothing allocated) ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("125M", 125_000_000),
        ("350m", 350_000_000),
        ("1.3B", 1_300_000_000),
        ("1.3G", 1_300_000_000),
        ("2e6", 2_000_000),
        ("2E6", 2_000_000),
        ("5000000", 5_000_000),
        ("5_000_000", 5_000_000),
        ("2.5M", 2_500_000),
        ("1500K", 1_500_000),
        (" 50M ", 50_000_000),
        ("0.001T", 1_000_000_000),
    ],
)
def test_parse_params(text: str, expected: int) -> None:
    assert bench.parse_params(text) == expected


@pytest.mark.parametrize(
    "text", ["", "lots", "125X", "M", "-5M", "1.3.0B", "125 M B", "0", "999999", "2T", "1e400"]
)
def test_parse_params_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"parameter|between"):
        bench.parse_params(text)


@pytest.mark.parametrize(
    ("n_params", "d_model", "n_layer"),
    [(125_000_000, 768, 12), (350_000_000, 1024, 24), (1_300_000_000, 2048, 24)],
)
def test_presets_are_gpt_shapes(n_params: int, d_model: int, n_layer: int) -> None:
    config = bench.model_config(n_params)
    assert (config.d_model, config.n_layer) == (d_model, n_layer)
    assert (config.vocab, config.n_positions) == (50257, 1024)
    assert abs(config.n_params - n_params) <= 0.1 * n_params


def test_125m_is_gpt2_small() -> None:
    config = bench.model_config(bench.parse_params("125M"))
    assert config.n_params == 124_439_808  # GPT-2 small, tied embeddings counted once
    shapes = config.shapes()
    assert len(shapes) == 2 + 12 * 12 + 2 + 1
    assert shapes["transformer.wte.weight"] == (50257, 768)
    assert shapes["transformer.h.11.attn.c_attn.weight"] == (768, 3 * 768)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * 768, 768)
    assert list(shapes)[-1] == "lm_head.weight"
    assert shapes["lm_head.weight"] == shapes["transformer.wte.weight"]


@pytest.mark.parametrize(
    "text", ["1M", "2M", "3M", "10M", "47M", "50M", "60M", "124M", "200M", "760M", "2.7B", "70B"]
)
def test_any_size_is_close_and_gpt_like(text: str) -> None:
    n = bench.parse_params(text)
    config = bench.model_config(n)
    assert abs(config.n_params - n) <= 0.1 * n
    assert config.d_model % 64 == 0
    assert config.n_layer >= 1
    assert 256 <= config.vocab <= 50257
    if n >= 100_000_000:
        assert config.vocab == 50257


def test_model_config_rejects_tiny() -> None:
    with pytest.raises(ValueError, match="at least"):
        bench.model_config(1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_build_state_dict(dtype: torch.dtype) -> None:
    config = bench.model_config(2_000_000)
    sd = bench.build_state_dict(config, dtype)
    assert list(sd) == list(config.shapes())
    assert all(tuple(t.shape) == config.shapes()[name] for name, t in sd.items())
    assert all(t.dtype == dtype for t in sd.values())
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    assert sum(t.numel() for t in bench.unique_tensors(sd).values()) == config.n_params
    assert benchtools.total_nbytes(sd) == config.n_params * sd["lm_head.weight"].element_size()
    again = bench.build_state_dict(config, dtype)
    assert all(torch.equal(sd[k], again[k]) for k in sd)  # same seed, same values
    assert float(sd["transformer.wpe.weight"].abs().max()) <= 0.0201  # +-0.02, rounded


def test_mismatches() -> None:
    sd = bench.build_state_dict(bench.model_config(1_000_000), torch.float32)
    copy = {k: v.clone() for k, v in sd.items()}
    copy["lm_head.weight"] = copy["transformer.wte.weight"]
    assert bench.mismatches(copy, sd, keeps_tied=True) == []
    assert bench.mismatches(bench.unique_tensors(copy), sd, keeps_tied=False) == []

    copy["transformer.h.0.ln_1.bias"].view(torch.uint8)[3] ^= 1  # one bit
    untied = dict(copy, **{"lm_head.weight": copy["lm_head.weight"].clone()})
    del untied["transformer.ln_f.bias"]
    problems = bench.mismatches(untied, sd, keeps_tied=True)
    assert any("names differ" in p and "transformer.ln_f.bias" in p for p in problems)
    assert "transformer.h.0.ln_1.bias: bytes differ" in problems
    assert any("no longer shares memory" in p for p in problems)

    half = dict(copy, **{"transformer.wpe.weight": sd["transformer.wpe.weight"].half()})
    assert any(
        "transformer.wpe.weight: torch.float16" in p for p in bench.mismatches(half, sd, True)
    )


# --- Runs -------------------------------------------------------------------------------------


def _table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(method, operation) -> the row's six columns, from the printed table."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    assert re.split(r"\s{2,}", lines[header]) == [
        "method",
        "operation",
        "seconds",
        "GB/s",
        "vs zerockpt",
        "peak MB",
    ]
    rows = {}
    for line in lines[header + 1 :]:
        if not line:
            break
        cols = re.split(r"\s{2,}", line)
        assert len(cols) == 6, line
        rows[cols[0], cols[1]] = cols
    return rows


def test_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run([*TINY, "--dir", str(tmp_path)], capsys)
    assert status == 0, err
    rows = _table_rows(out)
    assert list(rows) == [(m, op) for op in bench.OPERATIONS for m in METHODS]
    for (method, op), (_, _, secs, gbps, versus, peak) in rows.items():
        seconds = float(secs)
        assert seconds > 0
        assert (gbps == "-") == (op == bench.LOAD)
        ref = float(rows["zerockpt", op][2])
        if method == "zerockpt":
            assert versus == "1.00x (ref)"
        else:  # the printed ratio matches the printed times, within their rounding
            number, word = versus.split("x ")
            r = float(number) if word == "slower" else 1 / float(number)
            assert math.isclose(r, seconds / ref, rel_tol=0.02), (versus, seconds, ref)
        assert peak == "n/a" or float(peak.replace(",", "")) >= 0
    assert "Bitwise check: every loaded tensor equals the original." in out
    assert "os.fsync" in out and "Cache: warm" in out
    for method in METHODS:  # progress lines, one per result, as it goes
        assert f"  {method:<12} {bench.LOAD_READ:<12}" in err
    assert list(tmp_path.iterdir()) == []  # files and the temporary directory removed


def test_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bench.png"
    work = tmp_path / "work"
    work.mkdir()
    cold = hasattr(os, "posix_fadvise")
    argv = [*TINY, "--dtype", "bf16", "--no-fsync", "--json", "--plot", str(png)]
    argv += ["--cold"] if cold else []
    status, out, err = _run([*argv, "--dir", str(work)], capsys)
    assert status == 0, err
    doc: dict[str, Any] = json.loads(out)
    assert set(doc) >= {"model", "settings", "versions", "results", "verified", "mismatches"}
    busy = doc["other_cpu_fraction"]
    assert busy is None or 0 <= busy <= 1
    assert doc["verified"] is True and doc["mismatches"] == []
    model = doc["model"]
    assert model["requested_params"] == 2_000_000
    assert abs(model["params"] - 2_000_000) <= 200_000
    assert model["dtype"] == "bf16" and model["bytes"] == 2 * model["params"]
    assert doc["settings"] == {
        "runs": 1,
        "fsync": False,
        "cold": cold,
        "dir": str(work),
        "file_system": doc["settings"]["file_system"],
    }
    results = doc["results"]
    assert {(r["method"], r["operation"]) for r in results} == {
        (m, op) for m in METHODS for op in bench.OPERATIONS
    }
    ref = {r["operation"]: r["seconds"] for r in results if r["method"] == "zerockpt"}
    for r in results:
        assert set(r) == {
            "method",
            "operation",
            "seconds",
            "runs_seconds",
            "gb_per_s",
            "ratio_to_zerockpt",
            "peak_mb",
        }
        assert r["seconds"] > 0 and r["runs_seconds"] == [r["seconds"]]
        assert math.isclose(r["ratio_to_zerockpt"], r["seconds"] / ref[r["operation"]])
        if r["operation"] == bench.LOAD:
            assert r["gb_per_s"] is None  # a lazy load reads (almost) nothing
        else:
            assert math.isclose(r["gb_per_s"], model["bytes"] / r["seconds"] / 1e9)
        if r["peak_mb"] is not None:  # Linux
            assert r["peak_mb"] >= 0
            if r["operation"] == bench.LOAD_READ:  # mapped pages count once read
                assert r["peak_mb"] >= 0.5 * model["bytes"] / 1e6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
    assert list(work.iterdir()) == []


def test_ratio_text() -> None:
    results = [
        bench.Result("zerockpt", bench.SAVE, [0.5]),
        bench.Result("torch", bench.SAVE, [1.0, 2.05]),
        bench.Result("safetensors", bench.SAVE, [0.25]),
    ]
    lines = bench.table(results, 10**9)
    assert "2.00x slower" in lines[2] and "1.00 " in lines[2]
    assert "2.00x faster" in lines[3] and "4.00 " in lines[3]
    assert bench.ratio(results[1], results) == 2.0


def test_mismatch_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = bench._torch_load

    def corrupt(path: Path) -> dict[str, torch.Tensor]:
        loaded = {k: v.clone() for k, v in real_load(path).items()}
        if "transformer.wpe.weight" in loaded:
            loaded["transformer.wpe.weight"].view(torch.uint8)[-1] ^= 0x80
        return loaded

    monkeypatch.setattr(bench, "_torch_load", corrupt)
    status, out, err = _run([*TINY, "--dir", str(tmp_path)], capsys)
    assert status == 1
    assert "MISMATCH torch: transformer.wpe.weight: bytes differ" in err
    assert "Bitwise check: FAILED" in out
    assert list(tmp_path.iterdir()) == []


# --- Bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--params", "lots"], "125M"),
        (["--params", "10"], "between 1M and 1T"),
        (["--runs", "0"], "at least 1 run"),
        (["--dtype", "fp8"], "invalid choice"),
    ],
)
def test_bad_option_exits_2(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(argv, capsys)
    assert status == 2 and out == ""
    assert words in err and "zerockpt bench" in err
    assert err.startswith("zerockpt: error: ") and len(err.strip().splitlines()) == 1


def test_missing_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run([*TINY, "--dir", str(tmp_path / "nowhere")], capsys)
    assert status == 2
    assert "not a directory" in err and out == ""


def test_plot_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    png = tmp_path / "out.png"
    status, _, err = _run([*TINY, "--dir", str(tmp_path), "--plot", str(png)], capsys)
    assert status == 2
    assert "pip install matplotlib" in err and "zerockpt[plot]" in err
    assert len(err.strip().splitlines()) == 1
    assert not png.exists() and list(tmp_path.iterdir()) == []  # nothing ran


def test_module_imports_no_optional_packages() -> None:
    # matplotlib and safetensors are imported inside functions, when they are used.
    tree = ast.parse(Path(bench.__file__).read_text())
    top = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)
    }
    assert "torch" in top
    assert not top & {"matplotlib", "safetensors"}


def test_through_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("zerockpt.cli")
    assert cli.main(["bench", "--params", "lots"]) == 2
    assert "125M" in capsys.readouterr().err


def test_without_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "safetensors" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    found, notes = bench.methods()
    assert [m.name for m in found] == ["zerockpt", "torch"]
    assert notes == ["safetensors is not installed: skipped (pip install safetensors)"]


def test_errors_go_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench's errors are the command line's: one line (exit 2 for an option that cannot be
    carried out), or with --debug the exception itself."""
    nowhere = tmp_path / "nowhere"
    status, out, err = _run([*TINY, "--dir", str(nowhere)], capsys)
    assert status == 2 and out == ""
    assert err == f"zerockpt: error: --dir {nowhere}: not a directory\n"
    with pytest.raises(UsageError, match="not a directory"):
        bench.main([*TINY, "--dir", str(nowhere), "--debug"])
    with pytest.raises(UsageError, match="not a directory"):
        cli.main(["--debug", "bench", *TINY, "--dir", str(nowhere)])


def test_a_bug_in_bench_asks_for_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("internal")

    monkeypatch.setattr(bench, "measure", broken)
    status, _, err = _run([*TINY, "--dir", str(tmp_path)], capsys)
    assert status == 1
    assert err.splitlines()[-1] == f"zerockpt: error: {cli.BUG_REPORT}"
    assert "RuntimeError: internal" in err
    assert list(tmp_path.iterdir()) == []  # the temporary directory is removed
