"""Storage backends and segment fetchers: round trips, ranges across segments, bad files."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest

from astrai_data import (
    BaseSegmentFetcher,
    H5Storage,
    H5WriteConfig,
    JSONStorage,
    MultiSegmentFetcher,
    load_h5,
    open_storage,
    save_h5,
    save_json,
)

SMALL = H5WriteConfig(segment_tokens=100, chunk_tokens=16, buffer_tokens=37)


def test_fetcher_ranges_across_segment_boundaries_match_the_flat_stream():
    flat = np.arange(50)
    segments = [flat[:7], flat[7:8], flat[8:30], flat[30:]]
    fetcher = BaseSegmentFetcher(segments)
    assert fetcher.cum_lengths == [0, 7, 8, 30, 50] and fetcher.total_length == 50
    for begin in range(51):
        for end in range(begin, 51):
            np.testing.assert_array_equal(fetcher.fetch_data(begin, end), flat[begin:end])


def test_fetcher_rejects_ranges_outside_the_stream():
    fetcher = BaseSegmentFetcher([np.arange(10)])
    for begin, end in [(-1, 3), (5, 11), (6, 5)]:
        with pytest.raises(IndexError, match="outside the stream"):
            fetcher.fetch_data(begin, end)


def test_multi_fetcher_returns_aligned_keys():
    fetcher = MultiSegmentFetcher({"sequence": [np.arange(5), np.arange(5, 9)],
                                   "loss_mask": [np.arange(9) % 2 == 0]})
    out = fetcher.fetch_data(3, 7)
    np.testing.assert_array_equal(out["sequence"], [3, 4, 5, 6])
    np.testing.assert_array_equal(out["loss_mask"], [False, True, False, True])
    with pytest.raises(KeyError, match="available: sequence, loss_mask"):
        fetcher.key_fetch(0, 1, ["labels"])


def test_h5_round_trip_with_many_segments(tmp_path, stream_tokens):
    mask = stream_tokens % 3 == 0
    path = save_h5(tmp_path / "d.h5", "sft", {"sequence": stream_tokens, "loss_mask": mask},
                   info={"pad_id": 3}, tokenizer_fingerprint="abc", config=SMALL)
    storage = load_h5(path)
    assert storage.kind == "sft" and storage.keys() == ["sequence", "loss_mask"]
    assert len(storage) == 1000 and storage.meta.info["pad_id"] == 3
    with h5py.File(path) as f:  # self-describing: segments and their index are in the file
        assert list(f["segment_index/sequence"][()]) == [100] * 10
        assert f["streams/sequence/0"].chunks == (16,)
        assert f.attrs["format"] == "astrai-dataset" and f.attrs["format_version"] == 1
    out = storage.fetch(95, 205)
    np.testing.assert_array_equal(out["sequence"], stream_tokens[95:205])
    np.testing.assert_array_equal(out["loss_mask"], mask[95:205])


def test_h5_stores_small_vocab_ids_as_uint16_and_large_as_uint32(tmp_path):
    small = load_h5(save_h5(tmp_path / "a.h5", "seq", {"sequence": np.arange(10)},
                            info={"vocab_size": 8000}))
    big = load_h5(save_h5(tmp_path / "b.h5", "seq", {"sequence": np.arange(10)}))
    assert small.fetch(0, 3)["sequence"].dtype == np.uint16
    assert big.fetch(0, 3)["sequence"].dtype == np.uint32
    with pytest.raises(ValueError, match="out of range"):
        save_h5(tmp_path / "c.h5", "seq", {"sequence": np.array([70000])}, info={"vocab_size": 8000})
    assert not (tmp_path / "c.h5").exists()


def test_h5_compression_is_optional_and_transparent(tmp_path, stream_tokens):
    config = H5WriteConfig(segment_tokens=300, chunk_tokens=64, compression="gzip")
    storage = load_h5(save_h5(tmp_path / "z.h5", "seq", {"sequence": stream_tokens}, config=config))
    np.testing.assert_array_equal(storage.fetch(250, 650)["sequence"], stream_tokens[250:650])


def test_records_and_texts_round_trip(tmp_path):
    path = save_h5(tmp_path / "r.h5", "grpo", {"prompt": np.arange(6)},
                   records={"prompt_lengths": np.array([2, 4])},
                   texts={"answer": ["7", "十二"]}, info={"grpo_mode": "online"})
    storage = load_h5(path)
    np.testing.assert_array_equal(storage.records("prompt_lengths"), [2, 4])
    assert storage.texts("answer") == ["7", "十二"]
    with pytest.raises(KeyError, match="has: prompt_lengths"):
        storage.records("rewards")


def test_h5_storage_pickles_without_its_handle_and_reopens(tmp_path, stream_tokens):
    storage = load_h5(save_h5(tmp_path / "p.h5", "seq", {"sequence": stream_tokens}, config=SMALL))
    storage.fetch(0, 10)  # opens the file
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._file is None
    np.testing.assert_array_equal(clone.fetch(150, 260)["sequence"], stream_tokens[150:260])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_storage_has_the_same_interface(tmp_path, stream_tokens, suffix):
    mask = stream_tokens % 2 == 0
    segments = [stream_tokens[:333], stream_tokens[333:]]
    path = save_json(tmp_path / f"d{suffix}", "sft",
                     {"sequence": segments, "loss_mask": [mask[:333], mask[333:]]},
                     records={"extra": [[1, 2], [3, 4]]}, texts={"t": ["a"]})
    storage = open_storage(path)
    assert isinstance(storage, JSONStorage) and storage.kind == "sft"
    assert len(storage.segments["sequence"]) == 2
    out = storage.fetch(300, 400)
    np.testing.assert_array_equal(out["sequence"], stream_tokens[300:400])
    np.testing.assert_array_equal(out["loss_mask"], mask[300:400])
    np.testing.assert_array_equal(storage.records("extra"), [[1, 2], [3, 4]])
    assert storage.texts("t") == ["a"]


def test_opening_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        load_h5(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        open_storage(tmp_path / "nope.json")


def test_opening_a_file_that_is_not_hdf5_is_refused(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        load_h5(path)


def test_opening_someone_elses_hdf5_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="not an AstrAI dataset.*astrai data prepare"):
        load_h5(tmp_path / "other.h5")


def test_opening_another_format_version_is_refused(tmp_path):
    path = save_h5(tmp_path / "v.h5", "seq", {"sequence": np.arange(10)})
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(ValueError, match="format version 2 is not supported.*reads version 1"):
        load_h5(path)
    json_path = save_json(tmp_path / "v.json", "seq", {"sequence": [1, 2, 3]})
    data = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**data, "format_version": 9}))
    with pytest.raises(ValueError, match="format version 9"):
        open_storage(json_path)


def test_opening_a_truncated_file_is_refused(tmp_path, stream_tokens):
    path = save_h5(tmp_path / "t.h5", "seq", {"sequence": stream_tokens}, config=SMALL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_h5(path)
    json_path = save_json(tmp_path / "t.json", "seq", {"sequence": stream_tokens})
    json_path.write_text(json_path.read_text()[:50])
    with pytest.raises(ValueError, match="t.json:1: invalid JSON.*truncated"):
        open_storage(json_path)


def test_an_unfinished_file_is_refused(tmp_path):
    path = save_h5(tmp_path / "u.h5", "seq", {"sequence": np.arange(10)})
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(ValueError, match="not finished"):
        load_h5(path)


def test_a_corrupt_segment_index_is_refused(tmp_path):
    path = save_h5(tmp_path / "c.h5", "seq", {"sequence": np.arange(250)}, config=SMALL)
    with h5py.File(path, "a") as f:
        del f["segment_index/sequence"]
        f["segment_index/sequence"] = np.array([100, 100, 40])
    with pytest.raises(ValueError, match="does not match its segment index"):
        load_h5(path)


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):  # an object array has no HDF5 type: fails mid-write
        save_h5(tmp_path / "f.h5", "seq", {"sequence": np.arange(10)}, records={"x": None})
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_fingerprint_is_checked_on_load(tmp_path, char_tokenizer):
    path = save_h5(tmp_path / "k.h5", "seq", {"sequence": np.arange(10)},
                   tokenizer_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="prepared with tokenizer 000000000000"):
        load_h5(path, tokenizer=char_tokenizer)
    ok = save_h5(tmp_path / "ok.h5", "seq", {"sequence": np.arange(10)},
                 tokenizer_fingerprint=char_tokenizer.fingerprint())
    assert isinstance(load_h5(ok, tokenizer=char_tokenizer), H5Storage)
