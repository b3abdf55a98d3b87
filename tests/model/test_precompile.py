"""``seed_cache``: a node's Triton cache gets the entries of the image's precompiled cache that it
lacks, whole or not at all, and keeps its own. (The precompile itself: kernels/test_compile_sm90.py.)"""

from __future__ import annotations

from hymba_batch.model.precompile import seed_cache


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
