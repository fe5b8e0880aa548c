"""JSONL sample files: partial lines from killed runs, concurrent appends, resume bookkeeping."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from qfa import SearchSpace
from qfa.search.collect import CollectSettings, pending_indices
from qfa.search.records import append_records, atomic_write_text, check_consistent, read_records, space_id
from qfa.search.sampling import SamplingMix
from qfa.search.space import space_to_dict


def test_round_trip_and_partial_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    recs = [{"index": i, "top1": 10.0 + i} for i in range(5)]
    append_records(path, recs[:3])
    append_records(path, recs[3:])
    assert read_records(path) == recs
    with open(path, "ab") as f:  # a run killed in the middle of a write
        f.write(b'{"index": 5, "to')
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_records(path) == recs
    append_records(path, [{"index": 6}])  # the partial line is cut off first
    assert read_records(path) == [*recs, {"index": 6}]
    assert path.read_bytes().endswith(b"\n")


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}')
    assert read_records(path) == [{"index": 0}, {"index": 1}]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: not a JSON record"):
        read_records(path)
    assert read_records(tmp_path / "missing.jsonl") == []


def _writer(path: str, rank: int, n: int) -> None:
    for i in range(n):
        append_records(path, [{"rank": rank, "i": i, "pad": "x" * (100 + 37 * rank)}])


def test_concurrent_appends_stay_line_atomic(tmp_path):
    path = str(tmp_path / "s.jsonl")
    ctx = mp.get_context("fork")  # the children only append to a file
    procs = [ctx.Process(target=_writer, args=(path, r, 40)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = read_records(path)
    assert sorted((r["rank"], r["i"]) for r in recs) == [(r, i) for r in range(3) for i in range(40)]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "a" * 1000)
    atomic_write_text(path, "b")
    assert path.read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def _record(space, index, seed=0):
    return {
        "index": index,
        "seed": seed,
        "space_id": space_id(space),
        "space": space_to_dict(space),
        "top1": 1.0,
        "config": {},
    }


def test_pending_indices_resume_ranks_and_mismatches(tmp_path):
    space = SearchSpace()
    path = tmp_path / "s.jsonl"
    settings = CollectSettings(num_samples=10, seed=0)
    assert pending_indices(path, settings, space) == list(range(10))
    append_records(path, [_record(space, i) for i in (0, 3, 4, 9)])
    assert pending_indices(path, settings, space) == [1, 2, 5, 6, 7, 8]
    assert pending_indices(path, settings, space, rank=0, world_size=2) == [2, 6, 8]
    assert pending_indices(path, settings, space, rank=1, world_size=2) == [1, 5, 7]
    with pytest.raises(ValueError, match="seed 0; resume with --seed 0"):
        pending_indices(path, CollectSettings(num_samples=10, seed=1), space)
    with pytest.raises(ValueError, match="another supernet search space"):
        pending_indices(path, settings, SearchSpace(depth_list=(1, 2)))
    with pytest.raises(ValueError, match="rank=2"):
        pending_indices(path, settings, space, rank=2, world_size=2)
    # Records that store their sampling settings must be resumed with the same ones.
    other = tmp_path / "t.jsonl"
    append_records(other, [{**_record(space, 0), "sampling": settings.sampling()}])
    assert pending_indices(other, settings, space) == list(range(1, 10))
    changed = CollectSettings(num_samples=10, seed=0, mix=SamplingMix(p_full_depth=1.0), num_calib_batches=3)
    expected = r"drawn with .*'p_full_depth': 0.3.*this run: .*'num_calib_batches': 3,.*'p_full_depth': 1.0"
    with pytest.raises(ValueError, match=expected):
        pending_indices(other, changed, space)
    assert check_consistent(read_records(path), path) == space_to_dict(space)
    append_records(path, [_record(SearchSpace(bits_list=(2, 4)), 11)])
    with pytest.raises(ValueError, match="2 different search spaces"):
        check_consistent(read_records(path), path)
    assert json.loads(path.read_text().splitlines()[0])["index"] == 0
