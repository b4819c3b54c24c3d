import torch

from foldtune.data.collate import DynamicPadding, length_sorted_batches


def test_pads_to_the_longest_row_of_the_batch_not_max_len():
    collate = DynamicPadding(pad_token_id=0)
    batch = collate([
        {"input_ids": [101, 7, 8, 102], "labels": torch.tensor([1.0, 2.0])},
        {"input_ids": [101, 9, 102], "labels": torch.tensor([3.0, 4.0])},
    ])
    assert batch["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert batch["input_ids"].dtype == torch.long


def test_unlabelled_rows_have_no_labels_and_use_the_pad_id():
    batch = DynamicPadding(pad_token_id=3)([{"input_ids": [5]}, {"input_ids": [5, 6, 7]}])
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [[5, 3, 3], [5, 6, 7]]


def test_length_sorted_batches_cover_every_row_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert batches == [[1, 3, 5], [0, 4, 6], [2]]
