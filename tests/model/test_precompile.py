"""``seed_cache``: a node's Triton cache gets the entries of the image's precompiled cache that it
lacks, whole or not at all, and keeps its own; ``build_launchers`` builds a launcher per kernel
where the installed Triton makes them. (The precompile itself: kernels/test_compile_sm90.py.)"""

from __future__ import annotations

from hymba_batch.model.precompile import build_launchers, seed_cache


def _entry(root, name: str, text: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "k.cubin").write_text(text)
    (root / name / "k.json").write_text("{}")


def test_seed_copies_missing_entries_only(tmp_path):
    seed, cache = tmp_path / "seed", tmp_path / "node-cache"
    _entry(seed, "AAA", "seeded a")
    _entry(seed, "BBB", "seeded b")
    _entry(cache, "AAA", "compiled on this node")
    assert seed_cache(seed, cache) == 1
    assert (cache / "AAA" / "k.cubin").read_text() == "compiled on this node"
    assert (cache / "BBB" / "k.cubin").read_text() == "seeded b" and (cache / "BBB" / "k.json").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["AAA", "BBB"]  # no temporary directory left
    assert seed_cache(seed, cache) == 0


def test_missing_seed_is_a_no_op(tmp_path):
    assert seed_cache(tmp_path / "absent", tmp_path / "cache") == 0
    assert not (tmp_path / "cache").exists()


class _Kernel:
    def __init__(self, name: str) -> None:
        self.src, self.metadata = f"src {name}", f"meta {name}"


def _fake_driver(monkeypatch, per_kernel: bool, utils_error: Exception | None = None) -> list:
    """Triton's nvidia driver module as build_launchers sees it: with per-signature launchers
    (``make_launcher``, 3.6) or without (later versions); records what it is asked to build."""
    from triton.backends.nvidia import driver as nv

    built: list = []

    def utils() -> None:
        if utils_error:
            raise utils_error
        built.append("cuda_utils")

    if per_kernel:
        monkeypatch.setattr(nv, "make_launcher", lambda *a: "", raising=False)
    else:
        monkeypatch.delattr(nv, "make_launcher", raising=False)
    monkeypatch.setattr(nv, "CudaUtils", utils)
    monkeypatch.setattr(nv, "CudaLauncher", lambda src, meta: built.append((src, meta)))
    return built


def test_launchers_built_for_each_kernel_where_triton_makes_them(monkeypatch):
    built = _fake_driver(monkeypatch, per_kernel=True)
    assert build_launchers([_Kernel("a"), _Kernel("b")]) == {"launchers": 2}
    assert built == ["cuda_utils", ("src a", "meta a"), ("src b", "meta b")]


def test_no_launchers_where_triton_has_one_generic_launcher(monkeypatch):
    built = _fake_driver(monkeypatch, per_kernel=False)
    res = build_launchers([_Kernel("a")])
    assert res["launchers"] == 0 and "no per-kernel launchers" in res["launchers_skipped"] and built == []


def test_launchers_skipped_with_the_reason_where_libcuda_is_missing(monkeypatch):
    _fake_driver(monkeypatch, per_kernel=True, utils_error=AssertionError("libcuda.so cannot found!"))
    res = build_launchers([_Kernel("a")])
    assert res == {"launchers": 0, "launchers_skipped": "AssertionError: libcuda.so cannot found!"}
