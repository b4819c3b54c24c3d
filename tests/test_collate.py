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


def test_pad_to_a_multiple_for_compiled_models():
    batch = DynamicPadding(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [1]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 1]


def _bucket_epochs(lengths, batch_size, seed, epochs=2):
    from foldtune.data.collate import LengthBucketSampler

    sampler = LengthBucketSampler(lengths, batch_size, torch.Generator().manual_seed(seed), pool_batches=5)
    return [list(sampler) for _ in range(epochs)], sampler


def test_bucketed_batches_cover_every_row_once_and_waste_little_padding():
    import numpy as np

    lengths = np.random.default_rng(0).integers(20, 512, size=403)
    (first, second), sampler = _bucket_epochs(lengths, batch_size=8, seed=1)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(403))
        assert len(epoch) == len(sampler) == 51
    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    random_batches = [list(range(i, min(i + 8, 403))) for i in range(0, 403, 8)]
    # rows of a batch have similar lengths: far less padding than batches of random rows
    assert padded(first) - lengths.sum() < 0.25 * (padded(random_batches) - lengths.sum())
    assert first != second                                        # a new order every epoch
    assert _bucket_epochs(lengths, 8, seed=1)[0] == [first, second]   # and the same for the same seed


def test_padded_rows_give_the_batches_dynamic_padding_gives():
    import numpy as np
    from torch.utils.data import DataLoader

    from foldtune.data.collate import PaddedRows
    from foldtune.data.dataset import TextDataset

    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 30000, size=n).tolist() for n in rng.integers(1, 90, size=37)]
    for targets in (rng.random((37, 6)).astype(np.float32), None):
        data = TextDataset(ids, targets)
        for multiple in (1, 64):        # 64: a width rounded up past the longest row (89)
            expected = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3),
                                  collate_fn=DynamicPadding(1, multiple))
            got = DataLoader(range(len(data)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3),
                             collate_fn=PaddedRows(data, 1, multiple))
            pairs = list(zip(expected, got, strict=True))
            assert len(pairs) == 5
            for a, b in pairs:
                assert a.keys() == b.keys() == ({"input_ids", "attention_mask"} | ({"labels"} if targets is not None
                                                                                 else set()))
                for key in a:
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            assert {a["input_ids"].shape[1] % multiple for a, _ in pairs} == {0}


def test_filled_prediction_batches_drop_their_stand_in_rows():
    from foldtune.data.dataset import TextDataset
    from foldtune.runtime.predict import padded_batches, predict_batches
    from foldtune.runtime.precision import resolve_precision

    rows = [[2] + [10 + i] * n + [3] for i, n in enumerate([5, 9, 1, 9, 3, 7, 2])]
    dataset = TextDataset(rows)
    cpu = torch.device("cpu")
    batches = list(padded_batches(dataset, 3, 0, cpu, pad_to_multiple_of=4, rows_multiple=4))
    # three rows each (the last batch one), filled up to four with copies of the shortest
    assert [b[0] for b in batches] == [[1, 3, 5], [0, 4, 6], [2]]
    assert [tuple(b[1]["input_ids"].shape) for b in batches] == [(4, 12), (4, 8), (4, 4)]
    assert batches[0][1]["input_ids"][3].tolist() == batches[0][1]["input_ids"][2].tolist()

    class FirstToken(torch.nn.Module):        # "predicts" each row's first text token
        def forward(self, input_ids, attention_mask):
            return input_ids[:, 1:2].float()

    preds = predict_batches(FirstToken(), batches, len(rows), resolve_precision("fp32", cpu))
    assert preds[:, 0].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
