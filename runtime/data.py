"""Training data: rows of token ids prepared by bookcorpus.py, served as global batches.

Step k reads the global batch k of a seeded permutation of the rows (a new permutation each pass
over the data), so the batch a step sees depends only on (seed, step): any plan and any number of
processes read the same global batch, and each data-parallel rank takes its contiguous slice.
"""

import os

import datasets
import torch

from errors import UserError


class DataError(UserError):
    """A dataset that cannot be used; the message names the path or flag and the fix."""


def load_rows(dataset_path, seq_len=None):
    """The `input_ids` rows of a dataset saved with `save_to_disk`, as one int64 tensor [N, S]."""
    if not dataset_path:
        raise DataError("--dataset_path is required: a directory written by bookcorpus.py")
    if not os.path.isdir(dataset_path):
        raise DataError(f"--dataset_path {dataset_path}: no such directory; prepare one with "
                        "`python bookcorpus.py --save_path ...`")
    try:
        rows = datasets.load_from_disk(dataset_path)
    except Exception as e:  # noqa: BLE001 - any failure means it is not a saved dataset
        raise DataError(f"--dataset_path {dataset_path} is not a dataset saved by bookcorpus.py ({e})") from None
    if isinstance(rows, datasets.DatasetDict):
        if "train" not in rows:
            raise DataError(f"--dataset_path {dataset_path} has splits {list(rows)} but no 'train'")
        rows = rows["train"]
    if "input_ids" not in rows.column_names:
        raise DataError(f"--dataset_path {dataset_path} has no `input_ids` column (columns: {rows.column_names})")
    if len(rows) == 0:
        raise DataError(f"--dataset_path {dataset_path} holds no rows")
    tokens = torch.tensor(rows.with_format("numpy")["input_ids"][:], dtype=torch.long)
    if seq_len is not None and tokens.shape[1] != seq_len:
        raise DataError(f"--dataset_path {dataset_path} has rows of {tokens.shape[1]} tokens but the plan was "
                        f"compiled for --seq_len {seq_len}; prepare the data with --sequence_length {seq_len} or "
                        "recompile the plan")
    return tokens


class GlobalBatches:
    def __init__(self, rows, global_batch_size, seed):
        if len(rows) < global_batch_size:
            raise DataError(f"the dataset has {len(rows)} rows, fewer than one global batch "
                            f"(--global_batch_size {global_batch_size})")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.batches_per_pass = len(rows) // global_batch_size

    def batch(self, step):
        """[global_batch_size, S] token ids of step `step` (0-based)."""
        data_pass, index = divmod(step, self.batches_per_pass)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100003 + data_pass))
        chosen = order[index * self.global_batch_size:(index + 1) * self.global_batch_size]
        return self.rows[chosen]

    @staticmethod
    def local_slice(batch, data_rank, data_ranks):
        per_rank = batch.shape[0] // data_ranks
        return batch[data_rank * per_rank:(data_rank + 1) * per_rank]
