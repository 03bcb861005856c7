"""The maintainer documents stay true to the code: docs/architecture.md names every source file,
docs/design.md's constants exist with the values it states, and the chunk size is stated once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from zerockpt import _C

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCE_DIRS = ("csrc", "python/zerockpt")
SOURCE_SUFFIXES = {".py", ".pyi", ".h", ".hpp", ".c", ".cc", ".cpp"}
# Where the code defines constants (design.md's table names the file; the test looks in all of
# them, so that a constant moved between files is still found).
CODE_DIRS = ("csrc", "python/zerockpt")


def _source_files() -> list[str]:
    files = []
    for top in SOURCE_DIRS:
        for path in (ROOT / top).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix in SOURCE_SUFFIXES or path.name == "py.typed":
                files.append(path.relative_to(ROOT).as_posix())
    return sorted(files)


def test_the_source_tree_is_found() -> None:
    """Guards against a walk that checks nothing."""
    files = _source_files()
    assert "csrc/core/header.cpp" in files
    assert "python/zerockpt/serialization.py" in files
    assert len(files) > 50


def test_architecture_names_every_source_file() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = [f for f in _source_files() if f"`{f}`" not in text]
    assert not missing, (
        f"docs/architecture.md does not mention {missing}: add one line for each (layer, what "
        "it holds), and its place in the save or load path if it has one"
    )


def test_architecture_names_no_missing_file() -> None:
    """Every csrc/ or python/zerockpt/ path the map names exists (a renamed file is updated)."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:csrc|python/zerockpt)/[\w/.]+\.\w+)`", text))
    assert named
    gone = sorted(p for p in named if not (ROOT / p).is_file())
    assert not gone, f"docs/architecture.md names files that do not exist: {gone}"


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_links_between_the_docs_resolve() -> None:
    """The README links both maintainer docs; links among README.md and docs/*.md reach an
    existing file and, with ``#anchor``, an existing heading."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert "(docs/architecture.md" in text
    assert "(docs/design.md" in text
    for page in [readme, *sorted(DOCS.glob("*.md"))]:
        for target, anchor in re.findall(
            r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")
        ):
            linked = (page.parent / target).resolve()
            where = f"{page.relative_to(ROOT)} -> {target}"
            assert linked.is_file(), f"{where}: no such file"
            if anchor:
                assert anchor in _anchors(linked), f"{where}: no heading #{anchor}"


# --- design.md's constants ----------------------------------------------------------------------

_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _constants() -> list[tuple[str, str, str]]:
    """(constant, value, file) for each row of design.md's table of constants."""
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    section = re.search(r"## Constants\n(.*?)\n## ", text, re.S)
    assert section, "docs/design.md has no '## Constants' section"
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| `([^`]+)` \|", section.group(1), re.M)
    assert len(rows) >= 10, "the table of constants was not found"
    return [(name, value.strip(), file) for name, value, file in rows]


def _stated_value(value: str) -> float | None:
    """The number a value cell states, in bytes, plain units or seconds; None if it is no
    plain number (e.g. a formula)."""
    match = re.fullmatch(r"([0-9][0-9,]*(?:\.[0-9]+)?)(?: (KiB|MiB|GiB|ms|s))?", value)
    if match is None:
        return None
    number = float(match.group(1).replace(",", ""))
    unit = match.group(2)
    if unit in _UNITS:
        return number * _UNITS[unit]
    if unit == "ms":
        return number / 1000
    return float(number)


def _code() -> str:
    parts = []
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                parts.append(path.read_text(encoding="utf-8"))
    return "\n".join(parts)


def _defined_value(code: str, name: str) -> float | None:
    """The value the code gives ``name`` in a simple definition (``= 8ull << 20``, ``= 4096``,
    ``= 0.1``, ``{50}`` milliseconds), or None if it is not that simple."""
    short = name.split("::")[-1].removesuffix("()")
    alias = re.search(rf"\b{re.escape(short)}\s*=\s*([A-Za-z_]\w*)\s*;", code)
    if alias is not None:  # constexpr uint64_t kName = kOtherName;
        return _defined_value(code, alias.group(1))
    num = r"([0-9][0-9']*(?:\.[0-9]+)?)(?:u?ll|u)?"
    end = r"\s*(?:;|#|//|\n)"
    match = re.search(
        rf"\b{re.escape(short)}\s*(?:=\s*{num}(?:\s*<<\s*([0-9]+))?{end}|\{{{num}\}})", code
    )
    if match is None:
        return None
    if match.group(3) is not None:  # std::chrono::milliseconds kName{50}
        return int(match.group(3)) / 1000
    value = float(match.group(1).replace("'", ""))
    if match.group(2) is not None:
        value *= 1 << int(match.group(2))
    return value


CONSTANTS = _constants()


@pytest.mark.parametrize(("name", "value", "file"), CONSTANTS, ids=[c[0] for c in CONSTANTS])
def test_design_constant_exists_with_its_value(name: str, value: str, file: str) -> None:
    assert (ROOT / file).is_file(), f"docs/design.md: {name} is said to be in {file}, missing"
    code = _code()
    short = name.split("::")[-1].removesuffix("()")
    assert re.search(rf"\b{re.escape(short)}\b", code), f"no constant {name} in the code"
    stated = _stated_value(value)
    defined = _defined_value(code, name)
    if stated is not None and defined is not None:
        assert defined == pytest.approx(stated), (
            f"docs/design.md says {name} is {value}; the code says {defined}"
        )


def test_design_values_are_checked() -> None:
    """The values above are compared with the code for all but formulas (guards against
    parsing that silently compares nothing), the chunk size among them."""
    code = _code()
    compared = [
        n
        for n, v, _ in CONSTANTS
        if _stated_value(v) is not None and _defined_value(code, n) is not None
    ]
    assert len(compared) >= len(CONSTANTS) - 2, f"only {compared} are compared"
    (value,) = [v for n, v, _ in CONSTANTS if n == "kChunkBytes"]
    assert _stated_value(value) == _C.CHUNK_BYTES
    assert _defined_value(_code(), "kChunkBytes") == _C.CHUNK_BYTES


def test_chunk_size_is_stated_only_in_design_md() -> None:
    """Docstrings, comments, the README and the other docs name the chunk, not its size."""
    figure = f"{_C.CHUNK_BYTES >> 20} MiB"
    pattern = re.compile(rf"(?<![0-9.]){re.escape(figure)}")
    places = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for top in SOURCE_DIRS:
        places += [p for p in sorted((ROOT / top).rglob("*")) if p.suffix in SOURCE_SUFFIXES]
    restated = [
        p.relative_to(ROOT).as_posix()
        for p in places
        if p.name != "design.md" and pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert not restated, f"{figure!r} is restated in {restated}: refer to docs/design.md"
