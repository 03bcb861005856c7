"""zerockpt.safetensors and get_slice against safetensors 0.8 (the oracle), on the same files."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch as st
import torch
import zerockpt
import zerockpt.safetensors as zst
import zerockpt.safetensors.torch as zstt
from torch import nn

# ---------------------------------------------------------------------------------------------
# get_slice


SLICE_CASES: list[Any] = [
    slice(None), (), Ellipsis, 0, -1, 3, -4, 2**70, slice(0, 0), slice(2, 1), slice(1, 10),
    (slice(None), slice(1, 3)), slice(None, None, 2), slice(None, None, -1), slice(None, None, 0),
    (1, Ellipsis, 2), (Ellipsis, 1), (Ellipsis, Ellipsis), (0, 0, 0), (0, 0, 0, 0), None, 1.0,
    "x", [0], [], True, slice(-3, -1), slice(-10, None), slice(None, -10), slice(5, None),
    (slice(1, None, 2), slice(None, None, 3)), (0, Ellipsis, slice(1, 3)), (slice(None), -5),
    (slice(None), 5), (slice(2, None), -1), torch.tensor(1),
]  # fmt: skip


def _outcome(fn: Any) -> Any:
    try:
        out = fn()
    except Exception as e:
        return type(e)
    return out


def _same(ours: Any, theirs: Any, what: str) -> None:
    if isinstance(theirs, type):
        assert ours is theirs or (isinstance(ours, type) and issubclass(ours, theirs)), (
            f"{what}: safetensors raises {theirs.__name__}, zerockpt gave {ours!r}"
        )
        return
    assert isinstance(ours, torch.Tensor), f"{what}: zerockpt raised {ours!r}"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    assert ours.stride() == theirs.stride(), what  # a view, as safetensors returns
    assert torch.equal(ours, theirs), what


@pytest.fixture
def slice_file(tmp_path: Path) -> Path:
    path = tmp_path / "s.safetensors"
    st.save_file(
        {
            "a": torch.arange(60, dtype=torch.float32).reshape(3, 4, 5),
            "b": torch.arange(24, dtype=torch.int16).reshape(6, 4),
            "h": torch.randn(5, 7).to(torch.bfloat16),
            "s": torch.tensor(3.0, dtype=torch.float64),
            "e": torch.zeros(0, 3),
            "v": torch.arange(10, dtype=torch.uint8),
        },
        path,
    )
    return path


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")
@pytest.mark.parametrize("opener", ["zerockpt.open", "zerockpt.safetensors.safe_open"])
def test_get_slice_matches_safetensors(slice_file: Path, opener: str) -> None:
    ours = (
        zerockpt.open(slice_file)
        if opener == "zerockpt.open"
        else zst.safe_open(slice_file, framework="pt")
    )
    with ours, safetensors.safe_open(slice_file, framework="pt") as theirs:
        for name in ("a", "b", "h", "s", "e", "v"):
            mine, oracle = ours.get_slice(name), theirs.get_slice(name)
            assert mine.get_shape() == oracle.get_shape()
            assert mine.get_dtype() == oracle.get_dtype()
            for index in SLICE_CASES:
                _same(
                    _outcome(lambda m=mine, i=index: m[i]),
                    _outcome(lambda o=oracle, i=index: o[i]),
                    f"{name}[{index!r}]",
                )
        kept = ours.get_slice("a")
    # A slice outlives its file, as safetensors' does.
    assert torch.equal(kept[1, :, 2], torch.arange(60.0).reshape(3, 4, 5)[1, :, 2])


def test_get_slice_missing_name(slice_file: Path) -> None:
    with zerockpt.open(slice_file) as f, pytest.raises(KeyError):
        f.get_slice("nope")
    with pytest.raises(ValueError, match="closed"):
        f.get_slice("a")
    g = zst.safe_open(slice_file, framework="pt")
    with g, pytest.raises(zst.SafetensorError, match="File does not contain tensor nope"):
        g.get_slice("nope")


def test_get_slice_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    w = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    zerockpt.save({"w": w, "u": w + 1}, tmp_path / "ck", max_shard_size=20_000)
    with zerockpt.open(tmp_path / "ck") as f:
        assert f.get_slice("u").get_shape() == [64, 64]
        assert torch.equal(f.get_slice("u")[3:5, ::7], (w + 1)[3:5, ::7])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore on a fresh mapping, which reads nothing)."""
    size = os.path.getsize(path)
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_ahead_bytes(path: Path) -> int:
    """The kernel's read-ahead window of the block device holding ``path`` (128 KiB if unknown):
    a fault on a mapped page reads up to that much around it."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            return int((queue / "read_ahead_kb").read_text()) * 1024
        except (OSError, ValueError):
            continue
    return 128 * 1024


def test_get_slice_reads_only_the_pages_it_selects(tmp_path: Path) -> None:
    """Two rows of a 256 MiB tensor in a cold file: a few pages come into the page cache, not
    the tensor. A control read of 32 MiB of the same file shows the measurement sees reads."""
    rows, cols = 65536, 1024  # float32: 4 KiB rows, 256 MiB
    path = tmp_path / "big.safetensors"
    zerockpt.save({"w": torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)}, path)
    _drop_cache(path)
    baseline = _resident_bytes(path)
    if baseline > (1 << 20):
        pytest.skip(f"the page cache keeps {baseline} bytes of the file after DONTNEED here")
    with zerockpt.open(path) as f:
        part = f.get_slice("w")[30000:30002].clone()
    assert torch.equal(part[:, 0], torch.tensor([30000.0, 30001.0]))
    sliced = _resident_bytes(path)
    # 8 KiB selected; the kernel reads up to its read-ahead window around a mapped fault (8 MiB
    # on the test machines' virtual disk), plus the header's pages.
    bound = max(4 << 20, 2 * _read_ahead_bytes(path) + (1 << 20))
    if bound > 64 << 20:
        pytest.skip(f"read-ahead of {bound} bytes here: too coarse to measure a slice")
    assert sliced <= bound, f"a 2-row slice brought {sliced} bytes into the page cache"
    with zst.safe_open(path, framework="pt") as g:
        control = g.get_slice("w")[:8192].sum()  # 32 MiB
    assert control.item() == cols * sum(range(8192))
    assert _resident_bytes(path) >= sliced + (30 << 20), "the measurement does not see reads"


# ---------------------------------------------------------------------------------------------
# safe_open against safetensors.safe_open


def test_safe_open_matches_safetensors_on_their_files(tmp_path: Path) -> None:
    tensors = {"z": torch.ones(3), "b": torch.zeros(2, dtype=torch.float64), "a": torch.ones(0)}
    plain, with_md = tmp_path / "p.safetensors", tmp_path / "m.safetensors"
    st.save_file(tensors, plain)
    st.save_file(tensors, with_md, metadata={"format": "pt", "k": "v"})
    for path in (plain, with_md):
        with zst.safe_open(path, "pt") as ours, safetensors.safe_open(path, "pt") as theirs:
            assert ours.keys() == theirs.keys()
            assert ours.offset_keys() == theirs.offset_keys()
            assert ours.metadata() == theirs.metadata()
            for name in theirs.keys():  # noqa: SIM118  (safe_open is no dict)
                assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name))
            assert list(ours.get_tensors()) == list(theirs.get_tensors())
        assert list(zstt.load_file(path)) == list(st.load_file(path))


def test_metadata_round_trips_through_zerockpt_writer(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    for metadata in (None, {}, {"format": "pt"}, {"Something": "more", "a": "b"}):
        zstt.save_file({"t": torch.ones(2)}, path, metadata=metadata)
        with zst.safe_open(path, framework="pt") as f:
            assert f.metadata() == metadata
        # safetensors reads it, with zerockpt's own entries beside the user's.
        with safetensors.safe_open(path, framework="pt") as g:
            assert (metadata or {}).items() <= g.metadata().items()
            assert torch.equal(g.get_tensor("t"), torch.ones(2))
    # A plain zerockpt.save: its entries without zerockpt's own.
    zerockpt.save({"t": torch.ones(2)}, path, metadata={"k": "v"})
    with zst.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


@pytest.mark.parametrize(
    "framework", ["pt", "torch", "pytorch", "np", "numpy", "PT", "foo", "tf", None, 1]
)
def test_framework_like_safetensors(slice_file: Path, framework: Any) -> None:
    def get(opener: Any) -> Any:
        with opener(slice_file, framework=framework) as f:
            return f.get_tensor("b")

    theirs = _outcome(lambda: get(safetensors.safe_open))
    ours = _outcome(lambda: get(zst.safe_open))
    if isinstance(theirs, type):
        if theirs is safetensors.SafetensorError or framework == "tf":  # tf: not installed here
            assert ours is zst.SafetensorError
        else:
            assert ours is theirs
    else:
        assert type(ours) is type(theirs)
        assert (torch.as_tensor(ours) == torch.as_tensor(theirs)).all()


@pytest.mark.parametrize(
    "device", ["cpu", None, "meta", "foo", -1, "cpu:0", 1.5, "cuda:0", 0, torch.device("cpu")]
)
def test_device_like_safetensors(slice_file: Path, device: Any) -> None:
    def get(opener: Any) -> Any:
        with opener(slice_file, framework="pt", device=device) as f:
            return f.get_tensor("b").device

    ours = _outcome(lambda: get(zst.safe_open))
    if isinstance(device, torch.device):  # an extension: safetensors refuses torch.device
        assert ours == device
        return
    theirs = _outcome(lambda: get(safetensors.safe_open))
    if theirs is safetensors.SafetensorError:
        assert ours is zst.SafetensorError
    elif isinstance(theirs, type):
        assert isinstance(ours, type) and issubclass(ours, (theirs, RuntimeError)), (ours, theirs)
    else:
        assert ours == theirs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_device_like_safetensors(slice_file: Path, device: Any) -> None:
    with (
        zst.safe_open(slice_file, framework="pt", device=device) as ours,
        safetensors.safe_open(slice_file, framework="pt", device=device) as theirs,
    ):
        for name in ("a", "h", "s"):
            mine, oracle = ours.get_tensor(name), theirs.get_tensor(name)
            assert mine.device == oracle.device and torch.equal(mine, oracle)
        mine, oracle = ours.get_slice("a")[1:, ::2], theirs.get_slice("a")[1:, ::2]
        assert mine.device == oracle.device and torch.equal(mine, oracle)
    loaded, expected = zstt.load_file(slice_file, device=device), st.load_file(slice_file, device)
    assert list(loaded) == list(expected)
    assert all(v.device == expected[k].device and torch.equal(v, expected[k])
               for k, v in loaded.items())  # fmt: skip
    model = TiedLM().to("cuda")
    path = slice_file.with_name("tied.safetensors")
    st.save_model(TiedLM(), path)
    assert zstt.load_model(model, path, device=device) == (set(), [])
    assert model.lm_head.weight.device.type == "cuda"


def test_closed_handle_and_missing_file(slice_file: Path) -> None:
    for opener, error in ((zst.safe_open, zst.SafetensorError),):
        f = opener(slice_file, framework="pt")
        kept = f.get_slice("a")
        with f:
            pass
        calls = (f.keys, f.metadata, lambda g=f: g.get_tensor("a"), lambda g=f: g.get_slice("a"))
        for call in calls:
            with pytest.raises(error, match="File is closed"):
                call()
        assert kept.get_shape() == [3, 4, 5] and kept[0, 0, 0].item() == 0
    with pytest.raises(FileNotFoundError, match="No such file or directory: notafile"):
        zst.safe_open("notafile", framework="pt")
    bad = slice_file.with_name("bad.safetensors")
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(zst.SafetensorError, match=r"bad\.safetensors"):
        zst.safe_open(bad, framework="pt")
    with pytest.raises(zst.SafetensorError):
        zstt.load(b"\x00" * 8)


def test_files_are_interchangeable(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(17, 9),
        "i": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(4).to(torch.bfloat16),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "empty": torch.zeros(2, 0),
        "scalar": torch.tensor(True),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    zstt.save_file(tensors, ours, metadata={"m": "1"})
    st.save_file(tensors, theirs, metadata={"m": "1"})
    for a, b in ((st.load_file(ours), tensors), (zstt.load_file(theirs), tensors)):
        assert a.keys() == b.keys()
        for name in b:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    assert list(zstt.load_file(ours)) == list(st.load_file(theirs))  # the same byte order
    blob = zstt.save(tensors)
    assert st.load(blob).keys() == st.load(st.save(tensors)).keys()  # (their order is a hash's)
    assert all(torch.equal(v.view(torch.uint8), tensors[k].view(torch.uint8))
               for k, v in zstt.load(st.save(tensors)).items())  # fmt: skip


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize(
    "bad",
    [
        "notadict",
        {"t": {"some": "thing"}},
        {"t": torch.zeros(3, 4).t()},
        "sparse",
        "shared",
        {"t": torch.zeros(2, device="meta")},
    ],
)
def test_save_refuses_what_safetensors_refuses(tmp_path: Path, bad: Any) -> None:
    if bad == "sparse":
        bad = {"t": torch.sparse_coo_tensor(size=(2, 3))}
    if bad == "shared":
        base = torch.zeros(6)
        bad = {"a": base, "b": base[2:]}
    with pytest.raises(Exception) as theirs:
        st.save_file(bad, tmp_path / "theirs.safetensors")
    with pytest.raises(theirs.type):
        zstt.save_file(bad, tmp_path / "ours.safetensors")
    with pytest.raises(theirs.type):
        zstt.save(bad)
    assert not (tmp_path / "ours.safetensors").exists()


def test_both_import_spellings() -> None:
    from zerockpt.safetensors import load_file, safe_open, save_file  # noqa: F401
    from zerockpt.safetensors.torch import load_model, save_model  # noqa: F401

    assert zst.save_file is zstt.save_file and zst.load_model is zstt.load_model


# ---------------------------------------------------------------------------------------------
# Tied weights


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize(
    "state",
    [
        lambda: TiedLM().state_dict(),
        lambda: (lambda a: {"A": a, "B": a[:1], "C": a})(torch.zeros(3, 3)),
        lambda: (lambda a: {"x": a[:2], "y": a[2:], "z": a[:1], "w": a})(torch.zeros(4)),
        lambda: {"m": torch.zeros(4), "n": torch.zeros(4)},
    ],
)
def test_tied_name_choice_matches_safetensors(state: Any) -> None:
    sd = state()
    assert zstt._find_shared_tensors(sd) == st._find_shared_tensors(sd)
    assert zstt._remove_duplicate_names(sd) == st._remove_duplicate_names(sd)
    for preferred in (["lm_head.weight"], ["embed.weight"], ["B", "C"], ["w"]):
        assert zstt._remove_duplicate_names(sd, preferred_names=preferred) == (
            st._remove_duplicate_names(sd, preferred_names=preferred)
        )


@pytest.mark.parametrize("writer", ["safetensors", "zerockpt"])
@pytest.mark.parametrize("reader", ["safetensors", "zerockpt"])
def test_tied_model_round_trip(tmp_path: Path, writer: str, reader: str) -> None:
    torch.manual_seed(0)
    source = TiedLM()
    path = tmp_path / "tied.safetensors"
    (st if writer == "safetensors" else zstt).save_model(source, path)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.keys() == ["body.bias", "body.weight", "embed.weight"]  # one name stored
    target = TiedLM()
    result = (st if reader == "safetensors" else zstt).load_model(target, path)
    assert result == (set(), [])
    _assert_state_equal(target, _state(source))
    assert target.lm_head.weight is target.embed.weight  # still tied


def test_tied_model_file_holding_the_other_name(tmp_path: Path) -> None:
    """A file that stores lm_head.weight (not safetensors' choice) loads into the tied model."""
    source = TiedLM()
    sd = dict(source.state_dict())
    del sd["embed.weight"]
    path = tmp_path / "other.safetensors"
    st.save_file(sd, path)
    target = TiedLM()
    assert zstt.load_model(target, path) == st.load_model(TiedLM(), path) == (set(), [])
    _assert_state_equal(target, _state(source))


def test_load_model_missing_and_unexpected_like_safetensors(tmp_path: Path) -> None:
    class Untied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a

    untied, tied = tmp_path / "untied.safetensors", tmp_path / "tied.safetensors"
    st.save_model(Untied(), untied)
    st.save_model(Tied(), tied)
    for model_cls, path in ((Tied, untied), (Untied, tied)):
        with pytest.raises(RuntimeError) as theirs:
            st.load_model(model_cls(), path)
        with pytest.raises(RuntimeError) as ours:
            zstt.load_model(model_cls(), path)
        assert str(ours.value) == str(theirs.value)
        assert zstt.load_model(model_cls(), path, strict=False) == (
            st.load_model(model_cls(), path, strict=False)
        )


def test_load_state_dict_keeps_torch_semantics_for_tied_files(tmp_path: Path) -> None:
    """zerockpt.load_state_dict is torch's: the untied name is missing, as torch reports it."""
    path = tmp_path / "tied.safetensors"
    st.save_model(TiedLM(), path)
    with pytest.raises(RuntimeError) as ours:
        zerockpt.load_state_dict(TiedLM(), path)
    with pytest.raises(RuntimeError) as theirs:
        TiedLM().load_state_dict(st.load_file(path))
    assert str(ours.value) == str(theirs.value)


def _tiny_gpt2() -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(config).eval()


def test_transformers_save_pretrained_loads_with_zerockpt(tmp_path: Path) -> None:
    transformers, model = _tiny_gpt2()
    model.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "model.safetensors"
    fresh = transformers.GPT2LMHeadModel(model.config).eval()
    missing, unexpected = zstt.load_model(fresh, path, strict=False)
    assert (missing, unexpected) == st.load_model(
        transformers.GPT2LMHeadModel(model.config), path, strict=False
    )
    _assert_state_equal(fresh, _state(model))
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_zerockpt_save_model_loads_with_transformers(tmp_path: Path) -> None:
    transformers, model = _tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    zstt.save_model(model, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    _assert_state_equal(loaded, _state(model))
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
