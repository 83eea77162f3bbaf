"""Training data: rows of token ids prepared by bookcorpus.py, served as global batches.

Step k reads the global batch k of a seeded permutation of the rows (a new permutation each pass
over the data), so the batch a step sees depends only on (seed, step): any plan and any number of
processes read the same global batch, and each data-parallel rank takes its contiguous slice.
"""

import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from errors import UserError


class DataError(UserError):
    """A dataset that cannot be used; the message names the path or flag and the fix."""


def load_rows(dataset_path, seq_len=None, vocab_size=None):
    """The `input_ids` rows of a dataset saved with `save_to_disk`, as one int64 tensor [N, S].
    Checked when opened, so that a bad row is named now rather than crashing (or silently
    truncated) at the step that draws it: every row a list of integer ids, none missing, all rows
    of one length, each id in [0, vocab_size)."""
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
    tokens = _token_matrix(dataset_path, rows.with_format("arrow")["input_ids"])
    if vocab_size is not None:
        _check_vocabulary(dataset_path, tokens, vocab_size)
    if seq_len is not None and tokens.shape[1] != seq_len:
        raise DataError(f"--dataset_path {dataset_path} has rows of {tokens.shape[1]} tokens but the plan was "
                        f"compiled for --seq_len {seq_len}; prepare the data with --sequence_length {seq_len} or "
                        "recompile the plan")
    return tokens


FIX = "prepare the data with `python bookcorpus.py` (rows of integer token ids of one length)"


def _token_matrix(dataset_path, column):
    """The arrow column `input_ids` as an int64 tensor [N, S], or a DataError naming the row at fault
    (read from arrow, not numpy: numpy would turn float ids into float32 and missing ids into NaN)."""
    where = f"--dataset_path {dataset_path}"
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise DataError(f"{where}: field input_ids holds {kind} values, not lists of token ids; {FIX}")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row} of field input_ids is missing (null); {FIX}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ragged = np.flatnonzero(lengths != lengths[0])
    if ragged.size:
        row = int(ragged[0])
        raise DataError(f"{where}: row {row} of field input_ids has {lengths[row]} tokens but row 0 has "
                        f"{lengths[0]} (ragged rows); {FIX}")
    length = int(lengths[0])
    values = column.flatten()
    if not pa.types.is_integer(values.type):
        row, shown = 0, None
        if pa.types.is_floating(values.type):
            flat = values.to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
            if bad.size:
                row, shown = int(bad[0]) // max(length, 1), flat[bad[0]]
        held = f" (e.g. {shown})" if shown is not None else ""
        raise DataError(f"{where}: row {row} of field input_ids holds {values.type} values{held}, not integer "
                        f"token ids; {FIX}")
    if values.null_count:
        index = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {index // length} of field input_ids has a missing (null) token id; {FIX}")
    if length == 0:
        raise DataError(f"{where}: the rows of field input_ids are empty; {FIX}")
    flat = values.to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.int64, copy=False)).reshape(len(column), length)


def _check_vocabulary(dataset_path, tokens, vocab_size):
    """Every token id in [0, vocab_size): an id outside would crash the embedding at the step that draws it."""
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_size:
        return
    flat_index = int(tokens.argmin()) if low < 0 else int(tokens.argmax())
    row, token = divmod(flat_index, tokens.shape[1])
    value = low if low < 0 else high
    raise DataError(f"--dataset_path {dataset_path}: row {row} of field input_ids holds token id {value} (position "
                    f"{token}), outside the model's vocabulary 0..{vocab_size - 1} (vocab_size of --model_id); "
                    "tokenize the data with the model's tokenizer, or use a model whose vocab_size covers it")


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
