"""Training data: rows of token ids prepared by bookcorpus.py, served as global batches.

Step k reads the global batch k of a seeded permutation of the rows (a new permutation each pass
over the data), so the batch a step sees depends only on (seed, step): any plan and any number of
processes read the same global batch, and each data-parallel rank takes its contiguous slice.

A row is `input_ids` and, for instruction data (`bookcorpus.py --format sft`), `labels` (-100 where
a token is not a target: the prompt, padding) and `position_ids` (restarting at 0 where each packed
document starts). Without them the labels are the input ids and positions run 0..S-1 (pretraining).
Every rank holds the whole global batch, so the count of targets that the loss divides by (TOKENS)
is known on every rank without communication.
"""

import os
from dataclasses import dataclass
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from errors import UserError
from modeling import IGNORE_INDEX


class DataError(UserError):
    """A dataset that cannot be used; the message names the path or flag and the fix."""


@dataclass
class Batch:
    """Rows of token ids with their targets and positions, each [N, S] int64 (a dataset, a global
    batch, a rank's slice or a micro-batch). labels None: every next token is a target (the input
    ids themselves); position_ids None: 0..S-1 in every row, one document per row."""

    input_ids: torch.Tensor
    labels: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None

    def __len__(self):
        return self.input_ids.shape[0]

    def rows(self, index):
        """The rows `index` selects (a slice or an index tensor), as a Batch."""
        return Batch(*(None if t is None else t[index] for t in (self.input_ids, self.labels, self.position_ids)))

    def split(self, size):
        """Consecutive pieces of `size` rows (micro-batches)."""
        return [self.rows(slice(start, start + size)) for start in range(0, len(self), size)]

    def to(self, device, non_blocking=False):
        """The rows on `device`; non_blocking (to a GPU): copied from pinned host memory without the host
        waiting for the copy (the stream orders it before the kernels that read it)."""
        pinned = non_blocking and device.type == "cuda"
        return Batch(*(None if t is None else (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
                       for t in (self.input_ids, self.labels, self.position_ids)))

    def targets(self):
        """[N, S] what position s - 1 is trained to predict at s (IGNORE_INDEX: nothing)."""
        return self.input_ids if self.labels is None else self.labels

    def target_count(self):
        """Next-token targets of these rows: the labels after position 0 that are not IGNORE_INDEX
        (N * (S - 1) without labels)."""
        if self.labels is None:
            return len(self) * (self.input_ids.shape[1] - 1)
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def has_restarts(self):
        """Whether some row packs several documents (its position ids restart at 0 after its start)."""
        return self.position_ids is not None and bool((self.position_ids[:, 1:] == 0).any())


def load_rows(dataset_path, seq_len=None, vocab_size=None, flag="--dataset_path"):
    """The rows of a dataset saved with `save_to_disk`, as a Batch (`input_ids`, and `labels` and
    `position_ids` when it has them). Checked when opened, so that a bad row is named now rather than
    crashing (or silently truncated) at the step that draws it: every row a list of integer ids, none
    missing, all rows of one length, each id in [0, vocab_size); labels of the same shape, each -100
    or a token id, no document's first token a target; position ids of the same shape, >= 0, in each
    row counting up by one and restarting only at 0. `flag` names the option in the messages."""
    if not dataset_path:
        raise DataError(f"{flag} is required: a directory written by bookcorpus.py")
    if not os.path.isdir(dataset_path):
        raise DataError(f"{flag} {dataset_path}: no such directory; prepare one with "
                        "`python bookcorpus.py --save_path ...`")
    try:
        rows = datasets.load_from_disk(dataset_path)
    except Exception as e:  # noqa: BLE001 - any failure means it is not a saved dataset
        raise DataError(f"{flag} {dataset_path} is not a dataset saved by bookcorpus.py ({e})") from None
    if isinstance(rows, datasets.DatasetDict):
        if "train" not in rows:
            raise DataError(f"{flag} {dataset_path} has splits {list(rows)} but no 'train'")
        rows = rows["train"]
    if "input_ids" not in rows.column_names:
        raise DataError(f"{flag} {dataset_path} has no `input_ids` column (columns: {rows.column_names})")
    if len(rows) == 0:
        raise DataError(f"{flag} {dataset_path} holds no rows")
    where = f"{flag} {dataset_path}"
    arrow = rows.with_format("arrow")
    tokens = _int_matrix(where, arrow["input_ids"], "input_ids", FIX)
    if vocab_size is not None:
        _check_vocabulary(where, tokens, vocab_size)
    if seq_len is not None and tokens.shape[1] != seq_len:
        raise DataError(f"{where} has rows of {tokens.shape[1]} tokens but the plan was "
                        f"compiled for --seq_len {seq_len}; prepare the data with --sequence_length {seq_len} or "
                        "recompile the plan")
    positions = labels = None
    if "position_ids" in rows.column_names:
        positions = _int_matrix(where, arrow["position_ids"], "position_ids", SFT_FIX)
        _check_same_shape(where, "position_ids", positions, tokens)
        _check_positions(where, positions)
    if "labels" in rows.column_names:
        labels = _int_matrix(where, arrow["labels"], "labels", SFT_FIX)
        _check_same_shape(where, "labels", labels, tokens)
        _check_labels(where, labels, positions, vocab_size)
    return Batch(tokens, labels, positions)


FIX = "prepare the data with `python bookcorpus.py` (rows of integer token ids of one length)"
SFT_FIX = "prepare the data with `python bookcorpus.py --format sft`"


def _int_matrix(where, column, field, fix):
    """An arrow column of integer lists (`field`) as an int64 tensor [N, S], or a DataError naming
    the row at fault (read from arrow, not numpy: numpy would turn float ids into float32 and missing
    ids into NaN)."""
    kind = column.type
    what = "token ids" if field == "input_ids" else "integers"
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise DataError(f"{where}: field {field} holds {kind} values, not lists of {what}; {fix}")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row} of field {field} is missing (null); {fix}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ragged = np.flatnonzero(lengths != lengths[0])
    if ragged.size:
        row = int(ragged[0])
        raise DataError(f"{where}: row {row} of field {field} has {lengths[row]} tokens but row 0 has "
                        f"{lengths[0]} (ragged rows); {fix}")
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
        raise DataError(f"{where}: row {row} of field {field} holds {values.type} values{held}, not integer "
                        f"{what if field == 'input_ids' else 'values'}; {fix}")
    if values.null_count:
        index = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {index // length} of field {field} has a missing (null) "
                        f"{'token id' if field == 'input_ids' else 'value'}; {fix}")
    if length == 0:
        raise DataError(f"{where}: the rows of field {field} are empty; {fix}")
    flat = values.to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.int64, copy=False)).reshape(len(column), length)


def _check_vocabulary(where, tokens, vocab_size):
    """Every token id in [0, vocab_size): an id outside would crash the embedding at the step that draws it."""
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_size:
        return
    flat_index = int(tokens.argmin()) if low < 0 else int(tokens.argmax())
    row, token = divmod(flat_index, tokens.shape[1])
    value = low if low < 0 else high
    raise DataError(f"{where}: row {row} of field input_ids holds token id {value} (position "
                    f"{token}), outside the model's vocabulary 0..{vocab_size - 1} (vocab_size of --model_id); "
                    "tokenize the data with the model's tokenizer, or use a model whose vocab_size covers it")


def _check_same_shape(where, field, matrix, tokens):
    if matrix.shape[1] != tokens.shape[1]:
        raise DataError(f"{where}: the rows of field {field} have {matrix.shape[1]} values but those of input_ids "
                        f"{tokens.shape[1]}; one {field} value per token: {SFT_FIX}")


def _first(bad_NS):
    """(row, position) of the first True of a [N, S] boolean matrix, row by row."""
    row, position = divmod(int(torch.argmax(bad_NS.reshape(-1).to(torch.uint8))), bad_NS.shape[1])
    return row, position


def _check_positions(where, positions):
    """Position ids >= 0 that, along each row, count up by one and restart only at 0 (where a packed
    document starts): anything else would put tokens of one document at wrong rotary positions, or
    split documents where the data did not mean to."""
    negative = positions < 0
    if bool(negative.any()):
        row, position = _first(negative)
        raise DataError(f"{where}: row {row} of field position_ids holds {int(positions[row, position])} (position "
                        f"{position}); position ids are >= 0; {SFT_FIX}")
    following = positions[:, 1:]
    broken = (following != positions[:, :-1] + 1) & (following != 0)
    if bool(broken.any()):
        row, position = _first(broken)
        raise DataError(f"{where}: row {row} of field position_ids goes from {int(positions[row, position])} to "
                        f"{int(positions[row, position + 1])} at position {position + 1}; along a row position ids "
                        f"count up by one and restart at 0 where a document starts; {SFT_FIX}")


def _check_labels(where, labels, positions, vocab_size):
    """Each label -100 (no target) or a token id; no document's first token a target (it would be
    predicted from the previous document's last token, across the boundary the attention keeps);
    at least one target in the dataset."""
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < (vocab_size if vocab_size is not None else 2**62)))
    if not bool(valid.all()):
        row, position = _first(~valid)
        ids = f"a token id in 0..{vocab_size - 1}" if vocab_size is not None else "a token id >= 0"
        raise DataError(f"{where}: row {row} of field labels holds {int(labels[row, position])} (position {position}); "
                        f"a label is {IGNORE_INDEX} (not a target) or {ids}; {SFT_FIX}")
    targets = labels[:, 1:] != IGNORE_INDEX
    if positions is not None:
        crossing = targets & (positions[:, 1:] == 0)
        if bool(crossing.any()):
            row, position = _first(crossing)
            raise DataError(f"{where}: row {row} position {position + 1} starts a document (position_ids 0) but its "
                            f"label {int(labels[row, position + 1])} is a target, which the previous document's last "
                            f"token would be trained to predict; give each document's first token the label "
                            f"{IGNORE_INDEX} ({SFT_FIX} does)")
    if not bool(targets.any()):
        raise DataError(f"{where}: no row holds a target (every label after a row's first token is {IGNORE_INDEX}), "
                        f"so there is nothing to train on or evaluate; {SFT_FIX} from examples with responses")


class GlobalBatches:
    def __init__(self, rows, global_batch_size, seed, source="the dataset"):
        if len(rows) < global_batch_size:
            raise DataError(f"the dataset has {len(rows)} rows, fewer than one global batch "
                            f"(--global_batch_size {global_batch_size})")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.source = source
        self.batches_per_pass = len(rows) // global_batch_size

    def batch(self, step):
        """The Batch of global_batch_size rows of step `step` (0-based)."""
        data_pass, index = divmod(step, self.batches_per_pass)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100003 + data_pass))
        chosen = order[index * self.global_batch_size:(index + 1) * self.global_batch_size]
        return self.rows.rows(chosen)

    def target_count(self, batch, step):
        """TOKENS of step `step` (0-based): the next-token targets of its whole global batch, which the
        summed cross-entropy is divided by. A batch without any is refused: its mean is undefined."""
        count = batch.target_count()
        if count == 0:
            raise DataError(f"step {step + 1}: its global batch of {len(batch)} rows from {self.source} holds no "
                            f"targets (every label is {IGNORE_INDEX}), so its mean loss is undefined; drop the examples "
                            "without a response from the data (bookcorpus.py --format sft) or compile the plan for a "
                            "larger --global_batch_size")
        return count

    @staticmethod
    def local_slice(batch, data_rank, data_ranks):
        """This data rank's contiguous share of a global Batch."""
        per_rank = len(batch) // data_ranks
        return batch.rows(slice(data_rank * per_rank, (data_rank + 1) * per_rank))


def evaluation_batches(rows, global_batch_size):
    """The rows of an eval set in order, as global Batches of global_batch_size rows. A last batch
    that the rows do not fill is topped up with copies of the first row whose labels are all
    IGNORE_INDEX: they hold no target, so every row of the set counts exactly once, and every batch
    splits over the data ranks and micro-batches as a training batch does."""
    batches = [rows.rows(slice(start, start + global_batch_size)) for start in range(0, len(rows), global_batch_size)]
    last = batches[-1]
    missing = global_batch_size - len(last)
    if missing:
        filler = rows.rows(torch.zeros(missing, dtype=torch.long))
        no_targets = torch.full_like(filler.input_ids, IGNORE_INDEX)
        batches[-1] = Batch(torch.cat([last.input_ids, filler.input_ids]),
                            torch.cat([last.targets(), no_targets]),
                            None if rows.position_ids is None else torch.cat([last.position_ids, filler.position_ids]))
    return batches
