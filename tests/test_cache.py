"""The on-disk activation cache: exact round trip, resume after a crash, corruption found
on load, and the block-shuffled stream (deterministic, resumable, bounded memory)."""

from __future__ import annotations

import hashlib
import json
import math
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save

from hsae.data.cache import CachedActivations
from hsae.data.cache_writer import CacheWriter
from hsae.io import FormatError

META = {"model": "toy-model", "layer": 3, "text_source": "toy.jsonl", "context_len": 16}


def make_texts(n_texts: int, d: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """One activation block per text, of varying length (0 included), values exact in dtype."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 13, (n_texts,), generator=gen).tolist()
    return [torch.randn(n, d, generator=gen).to(dtype).float() for n in lengths]


def write_cache(directory, texts, shard_tokens=25, dtype="float32", meta=META, close=True):
    writer = CacheWriter(directory, meta, shard_tokens=shard_tokens, dtype=dtype)
    for block in texts[writer.texts_done :]:
        writer.add(block, 1)
    if close:
        writer.close()
    return writer


def id_cache(directory, n_rows: int, chunk_sizes=(7, 3, 11, 5), shard_tokens=20):
    """A float32 cache whose row r is (r, r, r): batches reveal which rows they drew."""
    writer = CacheWriter(directory, META, shard_tokens=shard_tokens)
    first, k = 0, 0
    while first < n_rows:
        size = min(chunk_sizes[k % len(chunk_sizes)], n_rows - first)
        ids = torch.arange(first, first + size, dtype=torch.float32)
        writer.add(ids[:, None].repeat(1, 3), 1)
        first, k = first + size, k + 1
    writer.close()
    return CachedActivations(directory)


def ids_of(batch: torch.Tensor) -> np.ndarray:
    assert batch.dtype == torch.float32
    assert torch.equal(batch[:, 0], batch[:, 1])
    return batch[:, 0].long().numpy()


def assert_each_row_once_per_epoch(batches: list[np.ndarray], n: int) -> None:
    """Every prefix of whole batches, P rows long, holds every one of the n rows
    floor(P / n) or ceil(P / n) times: no row comes back before all others have come."""
    counts = np.zeros(n, dtype=np.int64)
    for ids in batches:
        np.add.at(counts, ids, 1)
        assert counts.max() - counts.min() <= 1
    assert counts.sum() >= 2 * n  # the check spans an epoch boundary


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
    torch_dtype = getattr(torch, dtype)
    texts = make_texts(40, 6, seed=1, dtype=torch_dtype)
    write_cache(tmp_path / "c", texts, shard_tokens=25, dtype=dtype)
    expected = torch.cat(texts)

    cache = CachedActivations(tmp_path / "c", expected_d=6)
    assert (cache.n, cache.d, cache.dtype, cache.meta) == (len(expected), 6, dtype, META)
    got = list(cache.sequential(16))
    assert all(b.dtype == torch.float32 for b in got)
    assert [len(b) for b in got[:-1]] == [16] * (len(got) - 1)
    assert torch.equal(torch.cat(got), expected)
    assert torch.equal(torch.cat([cache.read_shard(i) for i in range(cache.n_shards)]), expected)
    assert torch.equal(cache.read(5, 60), expected[5:60])

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == len(expected)
    assert manifest["texts_done"] == len(texts)
    # Each shard ends at a text boundary and records how many texts precede its end.
    ends = np.cumsum([len(t) for t in texts])
    row_end = 0
    for entry in manifest["shards"]:
        row_end += entry["rows"]
        assert row_end == ends[entry["texts_done"] - 1]
    assert all(e["rows"] >= 25 for e in manifest["shards"][:-1])
    # Input scale: E||s x|| = sqrt(d) over every row.
    mean_norm = expected.double().norm(dim=1).mean().item()
    assert cache.scale == pytest.approx(math.sqrt(6) / mean_norm, rel=1e-6)


def test_held_out_split_and_sequential(tmp_path):
    cache = id_cache(tmp_path / "c", 100)
    train, held = cache.split_rows(30)
    assert (train.n, held.n) == (70, 30)
    assert ids_of(torch.cat(list(held.sequential(8)))).tolist() == list(range(70, 100))
    seen = [ids_of(b) for b in _take(train.batches(9, 4, buffer_tokens=40), 16)]
    assert max(ids.max() for ids in seen) < 70  # the held-out rows are never trained on
    assert_each_row_once_per_epoch(seen, 70)
    with pytest.raises(FormatError):
        cache.split_rows(100)


# ------------------------------------------------------------------ resume


def test_interrupted_cache_resumes_to_the_same_result(tmp_path, leftovers):
    texts = make_texts(60, 5, seed=2)
    write_cache(tmp_path / "whole", texts)

    crashed = write_cache(tmp_path / "part", texts[:37], close=False)  # no close: a crash
    assert crashed.n_tokens > sum(e["rows"] for e in crashed.shards)  # rows were lost in RAM
    with pytest.raises(FormatError, match="incomplete"):
        CachedActivations(tmp_path / "part")
    done = crashed.texts_done
    assert 0 < done < 37
    # A shard written but not yet listed, and temp files of interrupted atomic writes.
    orphan = tmp_path / "part" / f"shard_{len(crashed.shards):05d}.safetensors"
    orphan.write_bytes(b"half a shard")
    (tmp_path / "part" / ".shard_00001.safetensors.0123456789ab.tmp").write_bytes(b"x")
    (tmp_path / "part" / ".manifest.json.ba9876543210.tmp").write_bytes(b"{")

    resumed = CacheWriter(tmp_path / "part", META, shard_tokens=25)
    assert resumed.texts_done == done
    assert not orphan.exists() and not leftovers(tmp_path / "part")
    for block in texts[done:]:
        resumed.add(block, 1)
    resumed.close()

    whole, part = CachedActivations(tmp_path / "whole"), CachedActivations(tmp_path / "part")
    assert torch.equal(torch.cat(list(part.sequential(50))), torch.cat(texts))
    assert torch.equal(torch.cat(list(part.sequential(50))), torch.cat(list(whole.sequential(50))))
    assert part.manifest["shards"] == whole.manifest["shards"]  # same files, same checksums
    assert part.scale == whole.scale
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )


def test_reopening_with_other_settings_is_refused(tmp_path):
    write_cache(tmp_path / "c", make_texts(10, 4), close=False)
    for kwargs in (
        {"meta": {**META, "layer": 5}},
        {"meta": META, "dtype": "float16"},
        {"meta": META, "shard_tokens": 99},
    ):
        kwargs.setdefault("shard_tokens", 25)
        with pytest.raises(FormatError, match="written with other settings") as err:
            CacheWriter(tmp_path / "c", **kwargs)
        assert str(tmp_path / "c") in str(err.value) and "\n" not in str(err.value)


def test_a_complete_cache_takes_no_more_rows(tmp_path):
    write_cache(tmp_path / "c", make_texts(10, 4))
    writer = CacheWriter(tmp_path / "c", META, shard_tokens=25)
    assert writer.complete and writer.texts_done == 10
    writer.close()  # no-op
    with pytest.raises(ValueError, match="already complete"):
        writer.add(torch.zeros(2, 4), 1)


def test_writer_refuses_a_foreign_directory_and_bad_rows(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="notes.txt"):
        CacheWriter(tmp_path / "c", META)
    writer = CacheWriter(tmp_path / "d", META, dtype="float16")
    with pytest.raises(ValueError, match="float16"):
        writer.add(torch.full((2, 3), 1e6), 1)
    with pytest.raises(ValueError, match="NaN"):
        writer.add(torch.tensor([[0.0, float("nan"), 1.0]]), 1)


# ------------------------------------------------------------------ corruption


def test_corrupt_shard_is_named(tmp_path):
    write_cache(tmp_path / "c", make_texts(40, 6))
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    cache = CachedActivations(tmp_path / "c")  # same size: only the checksum can tell
    cache.read_shard(0)
    for read in (
        lambda: cache.read_shard(1),
        lambda: list(cache.sequential(7)),
        lambda: _take(CachedActivations(tmp_path / "c").batches(64, 0, buffer_tokens=1000), 3),
    ):
        with pytest.raises(FormatError, match="corrupt") as err:
            read()
        message = str(err.value)
        assert "shard_00001.safetensors" in message and "checksum" in message
        assert "\n" not in message


def test_truncated_or_missing_shard_is_named_at_open(tmp_path):
    write_cache(tmp_path / "c", make_texts(40, 6))
    shard = tmp_path / "c" / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(FormatError, match=r"shard_00002\.safetensors .*truncated"):
        CachedActivations(tmp_path / "c")
    shard.unlink()
    with pytest.raises(FormatError, match=r"shard_00002\.safetensors .*missing"):
        CachedActivations(tmp_path / "c")


def test_bad_manifest_is_named(tmp_path):
    write_cache(tmp_path / "c", make_texts(20, 4))
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="manifest.json"):
        CachedActivations(tmp_path / "c")
    path.write_text('{"format": "hsae-cache/1", ')
    with pytest.raises(FormatError, match="manifest.json"):
        CachedActivations(tmp_path / "c")


def test_non_finite_rows_are_named(tmp_path):
    """A shard with a NaN (valid checksum, so written by something else) is named on read."""
    write_cache(tmp_path / "c", make_texts(20, 4))
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    shard = CachedActivations(tmp_path / "c").read_shard(0)
    shard[3, 1] = float("nan")
    data = save({"acts": shard})
    (tmp_path / "c" / "shard_00000.safetensors").write_bytes(data)
    manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(manifest))
    cache = CachedActivations(tmp_path / "c")
    with pytest.raises(FormatError, match=r"shard_00000\.safetensors.* at row 3"):
        _take(cache.batches(1000, 0, buffer_tokens=10_000), 1)
    with pytest.raises(FormatError, match=r"shard_00000\.safetensors.* at row 3"):
        list(cache.sequential(5))


# ------------------------------------------------------------------ the shuffled stream


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_batches_deterministic_each_row_once_per_epoch(tmp_path):
    cache = id_cache(tmp_path / "c", 200)
    batch, buffer = 24, 50  # 200 rows: epochs end mid-batch
    first = _take(cache.batches(batch, 7, buffer_tokens=buffer), 30)
    again = _take(CachedActivations(tmp_path / "c").batches(batch, 7, buffer_tokens=buffer), 30)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(b.shape == (batch, 3) for b in first)

    ids = [ids_of(b) for b in first]
    assert_each_row_once_per_epoch(ids, 200)
    epoch_0, epoch_1 = np.concatenate(ids[:8]), np.concatenate(ids[9:16])  # whole batches
    assert not np.array_equal(np.sort(epoch_0), epoch_0)  # shuffled
    assert not np.array_equal(epoch_0[: len(epoch_1)], epoch_1)  # and differently each epoch
    order = np.concatenate(ids)
    other_seed = np.concatenate([ids_of(b) for b in _take(cache.batches(batch, 8, 0, buffer), 9)])
    assert not np.array_equal(other_seed, order[: len(other_seed)])
    assert np.array_equal(
        np.concatenate([cache.batch_rows(k, batch, 7, buffer) for k in range(30)]), order
    )


def test_start_step_equals_the_kth_batch(tmp_path):
    cache = id_cache(tmp_path / "c", 150)
    fresh = _take(cache.batches(16, 3, buffer_tokens=40), 25)
    for k in (1, 9, 10, 18, 23):  # 150 rows: batches 9 and 18 straddle epochs
        resumed = CachedActivations(tmp_path / "c").batches(16, 3, start_step=k, buffer_tokens=40)
        assert torch.equal(next(resumed), fresh[k])
        assert torch.equal(next(resumed), fresh[k + 1])


def _watch_loads(cache: CachedActivations) -> list[tuple[int, int, int]]:
    """Record every shard the reader loads from disk (`_load_raw`, one whole shard at a
    time) as (shard, rows, rows of earlier loads still alive at that moment)."""
    loads: list[tuple[int, int, int]] = []
    alive: list = []
    original = cache._load_raw

    def load_raw(index):
        live = sum(rows for ref, rows in alive if ref() is not None)
        data = original(index)
        loads.append((index, data.shape[0], live))
        alive.append((weakref.ref(data), data.shape[0]))
        return data

    cache._load_raw = load_raw
    return loads


def test_memory_is_bounded_by_the_buffer(tmp_path):
    """Windows group whole shards up to the buffer size, and only one is alive at a time."""
    cache = id_cache(tmp_path / "c", 400, shard_tokens=20)
    shard_rows = [e["rows"] for e in cache.manifest["shards"]]
    buffer = 70
    assert max(shard_rows) <= buffer < sum(shard_rows) / 4

    loads = _watch_loads(cache)
    assert_each_row_once_per_epoch(
        [ids_of(b) for b in _take(cache.batches(32, 1, 0, buffer), 40)], 400
    )
    held = [live + rows for _, rows, live in loads]  # rows in memory once a load is done
    assert max(held) <= buffer
    assert max(held) > max(shard_rows)  # shards are grouped
    for window in cache.epoch_plan(1, 0, buffer):
        assert sum(shard_rows[s] for s in window) <= buffer
    assert sorted(s for w in cache.epoch_plan(1, 0, buffer) for s in w) == list(
        range(len(shard_rows))
    )
    # each shard is read once per epoch (40 batches of 32 = 3.2 epochs of 400 rows)
    assert len(loads) <= 4 * len(shard_rows)


def test_order_within_a_batch(tmp_path):
    """Inside a batch, rows come shard by shard, the shards ordered by the middle of their
    place in their window (as a fraction of it): the window's shard order for a batch
    inside one window, an interleaving for a batch that straddles two."""
    n, batch, buffer, seed = 300, 48, 100, 5
    cache = id_cache(tmp_path / "c", n, shard_tokens=20)
    shard_rows = [e["rows"] for e in cache.manifest["shards"]]
    shard_of = np.repeat(np.arange(cache.n_shards), shard_rows)
    straddling = 0
    for k in range(40):
        epoch = k * batch // n
        if ((k + 1) * batch - 1) // n != epoch:
            continue  # a shard may then sit in two windows; other tests cover these batches
        key = {}  # shard -> (middle of its place in its window, window, place)
        for w, shards in enumerate(cache.epoch_plan(seed, epoch, buffer)):
            ends = np.cumsum([shard_rows[s] for s in shards])
            for i, s in enumerate(shards):
                key[s] = ((2 * ends[i] - shard_rows[s]) / (2 * ends[-1]), w, i)
        keys = [key[s] for s in shard_of[cache.batch_rows(k, batch, seed, buffer)]]
        assert keys == sorted(keys), k
        straddling += len({w for _, w, _ in keys}) == 2
    assert straddling >= 5


# ------------------------------------------------------------------ data-parallel parts


def test_each_rank_reads_its_own_shards(tmp_path):
    """N ranks' parts of batch k, concatenated in rank order, are the one-process batch k
    row for row; each rank loads only shards its rows come from, about 1/N of what one
    process loads plus the shards it shares with its neighbours (one per neighbour and
    window, give or take one), and holds about 1/N of the buffer."""
    id_cache(tmp_path / "c", 4800, chunk_sizes=(9, 4, 12, 6), shard_tokens=24)
    batch, buffer, seed, steps = 240, 480, 3, 40  # 2 epochs of ~15-shard windows

    def run(rank: int, world: int):
        cache = CachedActivations(tmp_path / "c")  # a fresh reader, as in its own process
        loads = _watch_loads(cache)
        got = _take(cache.batches(batch, seed, 0, buffer, rank=rank, world=world), steps)
        return got, loads, cache

    whole, one_loads, cache = run(0, 1)
    one_rows = sum(rows for _, rows, _ in one_loads)
    shard_rows = [e["rows"] for e in cache.manifest["shards"]]
    shard_of = np.repeat(np.arange(len(shard_rows)), shard_rows)
    plans = [cache.epoch_plan(seed, e, buffer) for e in range(2)]
    per_window = np.mean([len(w) for plan in plans for w in plan])  # shards in a window
    assert one_rows == 2 * 4800 and per_window > 12  # one process reads each shard per epoch
    for world in (2, 4):
        parts = [run(rank, world) for rank in range(world)]
        for k in range(steps):
            assert torch.equal(torch.cat([got[k] for got, _, _ in parts]), whole[k]), (world, k)
        for rank, (got, loads, _) in enumerate(parts):
            ids = np.concatenate([ids_of(b) for b in got])
            expected = [cache.batch_rows(k, batch, seed, buffer, rank, world) for k in range(steps)]
            assert np.array_equal(ids, np.concatenate(expected))
            assert {s for s, _, _ in loads} == set(shard_of[ids].tolist())  # nothing else
            share = sum(rows for _, rows, _ in loads) / one_rows
            neighbours = (rank > 0) + (rank < world - 1)
            assert 1 / world <= share <= 1 / world + 2 * neighbours / per_window, (world, share)
            held = max(live + rows for _, rows, live in loads)
            assert held <= buffer / world + 2 * neighbours * max(shard_rows), (world, held)
        total = sum(rows for _, loads, _ in parts for _, rows, _ in loads)
        assert total <= one_rows * (1 + 2 * (world - 1) / per_window)


def test_stream_argument_errors(tmp_path):
    cache = id_cache(tmp_path / "c", 30)
    for args in ((0, 1), (4, -1), (4, 1, -2), (4, 1, 0, 0), (6, 1, 0, 8, 0, 4), (4, 1, 0, 8, 2, 2)):
        with pytest.raises(ValueError):
            cache.batches(*args)
