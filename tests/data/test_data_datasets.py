"""SEQ/SFT windows, DPO and GRPO records, collation and DatasetFactory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from astrai_data import (
    DatasetFactory,
    DPODataset,
    GRPODataset,
    H5WriteConfig,
    SEQDataset,
    SFTDataset,
    collate_fn_for,
    load_h5,
    save_h5,
    save_json,
)

SMALL = H5WriteConfig(segment_tokens=100, chunk_tokens=16, buffer_tokens=37)


@pytest.fixture
def sft_file(tmp_path, stream_tokens):
    mask = stream_tokens % 3 == 0
    return save_h5(tmp_path / "sft.h5", "sft", {"sequence": stream_tokens, "loss_mask": mask},
                   config=SMALL, info={"pad_id": 3}), stream_tokens, mask


def _pairs(prompt_lens, chosen_lens, rejected_lens):
    """DPO content: prompt tokens 10.., chosen 100.., rejected 200..; masks on responses."""
    streams = {"chosen": [], "chosen_mask": [], "rejected": [], "rejected_mask": []}
    for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens, strict=True):
        for side, n, base in (("chosen", c, 100), ("rejected", r, 200)):
            streams[side].append(np.r_[np.arange(10, 10 + p), np.arange(base, base + n)])
            streams[f"{side}_mask"].append(np.r_[np.zeros(p, bool), np.ones(n, bool)])
    records = {"chosen_lengths": np.add(prompt_lens, chosen_lens),
               "rejected_lengths": np.add(prompt_lens, rejected_lens)}
    return streams, records


def test_seq_windows_across_segment_boundaries_equal_the_flat_stream(tmp_path, stream_tokens):
    tokens = stream_tokens
    path = save_h5(tmp_path / "seq.h5", "seq", {"sequence": tokens}, config=SMALL)
    dataset = DatasetFactory.load("seq", path, window_size=64, stride=50)
    assert isinstance(dataset, SEQDataset) and set(dataset[0]) == {"input_ids", "labels"}
    assert len(dataset) == (1000 - 65) // 50 + 1
    for i in range(len(dataset)):
        item = dataset[i]
        np.testing.assert_array_equal(item["input_ids"], tokens[i * 50:i * 50 + 64])
        np.testing.assert_array_equal(item["labels"], tokens[i * 50 + 1:i * 50 + 65])
        assert item["input_ids"].dtype == torch.long
    assert dataset[-1]["labels"][-1] == tokens[(len(dataset) - 1) * 50 + 64]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_stride_defaults_to_window_size(sft_file):
    dataset = DatasetFactory.load("sft", sft_file[0], window_size=100)
    assert dataset.stride == 100 and len(dataset) == 9  # the last window needs token 900 + 100


def test_sft_loss_mask_is_aligned_with_labels(sft_file):
    path, tokens, mask = sft_file
    dataset = DatasetFactory.load("sft", path, window_size=40, stride=33)
    assert isinstance(dataset, SFTDataset)
    for i in range(len(dataset)):
        item = dataset[i]
        start = i * 33
        np.testing.assert_array_equal(item["loss_mask"], mask[start + 1:start + 41])
        assert item["loss_mask"].dtype == torch.bool
        np.testing.assert_array_equal(item["labels"], tokens[start + 1:start + 41])


def test_window_size_is_required_and_must_fit(sft_file):
    with pytest.raises(ValueError, match="needs window_size"):
        DatasetFactory.load("sft", sft_file[0])
    with pytest.raises(ValueError, match="1000 tokens are too few.*window_size=1000"):
        DatasetFactory.load("sft", sft_file[0], window_size=1000)
    with pytest.raises(ValueError, match="stride must be a positive"):
        DatasetFactory.load("sft", sft_file[0], window_size=10, stride=0)


def test_factory_refuses_a_file_of_another_kind(sft_file):
    with pytest.raises(ValueError, match="holds a 'sft' dataset.*--strategy seq.*--strategy sft"):
        DatasetFactory.load("seq", sft_file[0], window_size=16)
    with pytest.raises(ValueError, match="unknown dataset strategy 'ppo'"):
        DatasetFactory.load("ppo", sft_file[0])


def test_factory_lists_and_creates_every_strategy(sft_file):
    assert set(DatasetFactory.list_registered()) == {"seq", "sft", "dpo", "grpo"}
    dataset = DatasetFactory.create("sft", load_h5(sft_file[0]), window_size=8)
    assert isinstance(dataset, SFTDataset) and dataset.window_size == 8


def test_seq_and_sft_batches_through_a_dataloader(sft_file):
    dataset = DatasetFactory.load("sft", sft_file[0], window_size=32)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["loss_mask"].dtype == batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].all()


def test_dataloader_workers_reopen_the_file(sft_file):
    dataset = DatasetFactory.load("sft", sft_file[0], window_size=20)
    dataset[0]  # the parent opens the file before the workers fork
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=dataset.collate_fn)
    got = torch.cat([b["input_ids"] for b in loader])
    want = torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])
    assert torch.equal(got, want)


def test_dpo_items_are_records_with_masks_on_responses_only(tmp_path):
    streams, records = _pairs([3, 5], [2, 4], [1, 3])
    path = save_h5(tmp_path / "dpo.h5", "dpo", streams, records=records, config=SMALL)
    dataset = DatasetFactory.load("dpo", path)
    assert isinstance(dataset, DPODataset) and len(dataset) == 2
    item = dataset[1]
    assert item["chosen_input_ids"].tolist() == [10, 11, 12, 13, 14, 100, 101, 102]
    assert item["chosen_labels"].tolist() == [11, 12, 13, 14, 100, 101, 102, 103]
    assert item["chosen_loss_mask"].tolist() == [False] * 4 + [True] * 4
    assert item["rejected_labels"].tolist() == [11, 12, 13, 14, 200, 201, 202]
    assert item["rejected_loss_mask"].tolist() == [False] * 4 + [True] * 3


def test_dpo_collate_right_pads_each_side(tmp_path):
    streams, records = _pairs([3, 5], [2, 4], [1, 3])
    path = save_h5(tmp_path / "dpo.h5", "dpo", streams, records=records, info={"pad_id": 3})
    dataset = DatasetFactory.load("dpo", path)
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert batch["chosen_input_ids"].shape == (2, 8) and batch["rejected_input_ids"].shape == (2, 7)
    assert batch["chosen_input_ids"][0].tolist() == [10, 11, 12, 100, 3, 3, 3, 3]
    assert batch["chosen_attention_mask"][0].tolist() == [True] * 4 + [False] * 4
    assert batch["chosen_loss_mask"][0].tolist() == [False, False, True, True] + [False] * 4
    assert batch["rejected_attention_mask"].sum(1).tolist() == [3, 7]
    assert all(v.dtype == (torch.bool if "mask" in k else torch.long) for k, v in batch.items())


def test_dpo_window_cuts_the_prompt_before_the_response(tmp_path):
    streams, records = _pairs([6], [3], [5])
    dataset = DPODataset(load_h5(save_h5(tmp_path / "d.h5", "dpo", streams, records=records)),
                         window_size=5)
    item = dataset[0]
    assert item["chosen_input_ids"].tolist() == [13, 14, 15, 100, 101]  # prompt cut on the left
    assert item["chosen_labels"].tolist() == [14, 15, 100, 101, 102]
    assert item["rejected_input_ids"].tolist() == [15, 200, 201, 202, 203]  # one prompt token left
    assert item["rejected_loss_mask"].all()


def _grpo_file(tmp_path, suffix=".h5"):
    """Two prompts (3 and 2 tokens) with G=3 responses each, response g of length g+1."""
    seqs, masks, lengths = [], [], []
    for p in (3, 2):
        row = []
        for g in range(3):
            seqs.append(np.r_[np.arange(10, 10 + p), np.arange(50 + 10 * g, 51 + 11 * g)[:g + 1]])
            masks.append(np.r_[np.zeros(p, bool), np.ones(g + 1, bool)])
            row.append(p + g + 1)
        lengths.append(row)
    rewards = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]], np.float32)
    content = {"sequence": seqs, "loss_mask": masks}
    records = {"lengths": np.array(lengths), "rewards": rewards}
    save = save_h5 if suffix == ".h5" else save_json
    return save(tmp_path / f"g{suffix}", "grpo", content, records=records,
                info={"grpo_mode": "offline", "pad_id": 3}), rewards


@pytest.mark.parametrize("suffix", [".h5", ".json"])
def test_grpo_items_are_groups_and_batches_are_b_g_t(tmp_path, suffix):
    path, rewards = _grpo_file(tmp_path, suffix)
    dataset = DatasetFactory.load("grpo", path)
    assert isinstance(dataset, GRPODataset) and len(dataset) == 2 and dataset.group_size == 3
    item = dataset[0]
    assert item["input_ids"].shape == item["loss_mask"].shape == item["attention_mask"].shape == (3, 5)
    assert item["rewards"].dtype == torch.float32 and item["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert item["input_ids"][0].tolist() == [10, 11, 12, 3, 3]
    assert item["labels"][1].tolist() == [11, 12, 60, 61, 3]
    assert item["loss_mask"][2].tolist() == [False, False, True, True, True]
    assert item["attention_mask"].sum(1).tolist() == [3, 4, 5]
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 3, 5) and batch["rewards"].shape == (2, 3)
    assert torch.equal(batch["rewards"], torch.from_numpy(rewards))
    assert batch["loss_mask"][1].sum(1).tolist() == [1, 2, 3]


def test_grpo_online_items_are_prompts_collated_as_a_list(tmp_path):
    path = save_h5(tmp_path / "o.h5", "grpo", {"prompt": np.arange(5)},
                   records={"prompt_lengths": np.array([2, 3])},
                   texts={"prompt": ["1+1?", "二加三？"], "answer": ["2", "5"], "lang": ["en", "zh"],
                          "messages": ['[{"role": "user", "content": "1+1?"}]',
                                       '[{"role": "user", "content": "二加三？"}]']},
                   info={"grpo_mode": "online"})
    dataset = DatasetFactory.load("grpo", path)
    assert dataset.online and len(dataset) == 2
    item = dataset[1]
    assert item["prompt_ids"].tolist() == [2, 3, 4] and item["prompt_ids"].dtype == torch.long
    assert (item["prompt"], item["answer"], item["lang"]) == ("二加三？", "5", "zh")
    assert item["messages"] == [{"role": "user", "content": "二加三？"}]
    batch = collate_fn_for("grpo")([dataset[0], dataset[1]])
    assert isinstance(batch, list) and batch[0]["answer"] == "2"


def test_collate_fn_for_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="no collate function for 'ppo'"):
        collate_fn_for("ppo")
