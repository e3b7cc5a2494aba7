"""The suite's own ordering (tests/conftest.py): the files ranked slowest-first exist under these paths, and
`--shuffle-seed N` gives one order per seed that keeps each file's tests together."""

from __future__ import annotations

from types import SimpleNamespace

from tests.conftest import SLOWEST_FIRST, TESTS, pytest_collection_modifyitems


def test_slowest_first_names_files_that_exist():
    assert [name for name in SLOWEST_FIRST if not (TESTS / name).is_file()] == []
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)


def _ordered(seed: int | None) -> list[tuple[str, int]]:
    # stand-ins for pytest.Item: the hook reads only `.path`
    items = [SimpleNamespace(path=TESTS / name, n=n) for name in ("test_data.py", "extraction/test_backend.py",
                                                                   "demo/test_pipeline.py", "probing/test_probes.py")
             for n in range(6)]
    config = SimpleNamespace(getoption=lambda option: {"--shuffle-seed": seed}[option])
    pytest_collection_modifyitems(config, items)
    return [(item.path.relative_to(TESTS).as_posix(), item.n) for item in items]


def test_default_order_puts_the_ranked_files_first_and_keeps_collection_order_within():
    assert _ordered(None) == [(name, n) for name in ("extraction/test_backend.py", "demo/test_pipeline.py",
                                                      "test_data.py", "probing/test_probes.py") for n in range(6)]


def test_shuffle_seed_is_a_seeded_permutation_that_keeps_files_together():
    plain, first, again, other = _ordered(None), _ordered(1), _ordered(1), _ordered(2)
    assert sorted(first) == sorted(plain)
    assert first == again  # one order per seed, so a failing order can be run again
    assert first != other
    for order in (first, other):
        files = [name for name, _ in order]
        blocks = [name for i, name in enumerate(files) if i == 0 or files[i - 1] != name]
        assert len(blocks) == 4  # each file's tests in one block: its module-scoped fixtures are built once
        assert [n for name, n in order if name == "test_data.py"] != list(range(6))  # shuffled inside a file too
