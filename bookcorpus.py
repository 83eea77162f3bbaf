"""Prepare a pre-training data set: tokenize documents, wrap each in BOS/EOS, concatenate, cut into rows.

    python bookcorpus.py --data_path_or_name bookcorpus/bookcorpus \\
        --tokenizer_path_or_name deepseek-ai/DeepSeek-Coder-V2-Lite-Base \\
        --save_path ./bookcorpus_2k --sequence_length 2048 --num_proc 16

Every document becomes ``[bos] + tokens + [eos]``; the documents are concatenated in their original
order into one token stream, and the stream is cut into rows of exactly ``--sequence_length`` tokens.
Nothing is dropped or repeated except the final remainder, shorter than one row. The rows are saved
with ``Dataset.save_to_disk`` as one column ``input_ids`` (int32) that ``datasets.load_from_disk``
reads back.

Input (``--data_path_or_name``) is a local file or directory, or else a Hugging Face hub data set:

* ``.txt``: one document per non-empty line (lines holding only whitespace are skipped too);
* ``.jsonl`` / ``.json``: one JSON object per line (or a JSON array of objects), text in ``--text_column``;
* ``.parquet``: text in ``--text_column``;
* a directory: every file in it with one of those extensions, in name order; all of one kind;
* anything else that does not exist locally and does not look like a path: ``load_dataset(name, split="train")``.

Local text and JSON files must be UTF-8: the first invalid byte is reported by file, line and byte
before any work. A document of any length is tokenized in bounded memory: one longer than
``PIECE_CHARS`` characters is tokenized in pieces cut at spaces between words and its ids are
concatenated (see ``PIECE_CHARS``). Code shipped with a hub tokenizer runs only with
``--trust_remote_code``.

``--format sft`` prepares instruction-tuning data instead (JSON lines / JSON / parquet examples with
``instruction`` and ``output``, or ``messages``): rendered with the tokenizer's chat template or the
DeepSeek format, only the responses labelled, packed into rows with per-example position ids. That
work lives in ``sft_data.py``; this file keeps the command line.

The work is in importable functions (``load_documents``, ``load_tokenizer``, ``tokenize_and_chunk``,
``main``) so tests and other scripts can call them. Problems with the input raise ``BookcorpusError``;
``main`` prints those as one ``error: ...`` line on stderr and returns exit code 2, like argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from errors import UserError, run_cli

# datasets / transformers are imported at module level (not lazily): every code path needs them,
# and `--help` staying a second slower is the lesser evil than scattered imports.
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

# Local file kinds we read, by extension, and the `datasets` packaged builder that reads each.
# .json and .jsonl are the same kind: the json builder reads JSON lines and JSON arrays alike.
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}

# Extensions that mark an argument as a file path even when the file is missing. We do not treat
# *any* dot as an extension because hub ids may contain dots (e.g. "org/dataset-v1.5").
PATH_LIKE_EXTENSIONS = set(BUILDER_BY_EXTENSION) | {
    ".arrow", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".md", ".xml", ".html",
}

# The saved column: int32 holds every token id of any real vocabulary and halves the size on disk
# compared with int64 (BookCorpus at 2k tokens per row is about a billion tokens).
OUTPUT_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})

# Documents per batch in the tokenizing map and in the chunking pass.
BATCH_SIZE = 1000

# Long documents are tokenized in pieces, so memory stays bounded whatever a document's length (a
# fast tokenizer holds ~100 bytes per token while encoding: a 54 MB line took 9.5 GB at once). A
# document longer than PIECE_CHARS characters is cut into consecutive pieces of at most that many,
# each cut made just before a space that has a non-space on both sides (else before any whitespace,
# else, in a run of PIECE_CHARS characters without whitespace, at PIECE_CHARS), and the pieces'
# token ids are concatenated. Such a cut is a boundary of byte-level BPE pre-tokenization (the
# space starts the next word's token), so the ids equal those of the whole document for GPT-2 /
# DeepSeek style tokenizers; with other tokenizers, or at a forced cut, a token may be split in two
# at a cut (one cut per PIECE_CHARS characters, only in documents longer than that). One tokenizer
# call sees at most CALL_CHARS characters (pieces and short documents of a batch are grouped).
PIECE_CHARS = 1 << 16
CALL_CHARS = 1 << 20


class BookcorpusError(UserError):
    """A problem with the user's input or flags. main() prints it as `error: <message>` and exits 2."""


@dataclass(frozen=True)
class ChunkStats:
    """What tokenize_and_chunk produced: counts for the closing line and for tests."""

    documents: int  # documents read (after dropping blank lines of .txt files)
    tokens: int  # tokens in the concatenated stream, BOS and EOS included
    rows: int  # rows of sequence_length tokens written
    sequence_length: int
    remainder: int  # tokens at the end of the stream that did not fill a row, and were dropped

    def summary(self, save_path: str | os.PathLike) -> str:
        return (
            f"bookcorpus: wrote {self.rows} rows of {self.sequence_length} tokens to {save_path} "
            f"({self.documents} documents, {self.tokens} tokens, "
            f"dropped final remainder of {self.remainder} tokens)"
        )


# --------------------------------------------------------------------------------------------
# Input: where the documents come from
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """True when `name` is meant as a local path (so a missing one is an error, not a hub id)."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    return Path(name).suffix.lower() in PATH_LIKE_EXTENSIONS


def _has_content(path: Path, builder: str) -> bool:
    """False for a file that holds no documents at all.

    datasets 5 fails on such files with unhelpful errors (an empty .jsonl raises a bare
    StopIteration, an empty .txt or 0-row .parquet a DatasetGenerationError), so we skip them
    ourselves and report an empty data set in our own words when nothing is left.
    """
    if path.stat().st_size == 0:
        return False
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:
            return True  # not readable as parquet: let datasets raise its error, which we wrap
    # Text or JSON: look for any non-whitespace byte; reading stops at the first one, so a large
    # file costs one read.
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def resolve_data_files(data_path_or_name: str) -> Optional[tuple[str, list[str]]]:
    """Decide where the data comes from.

    Returns (builder, files) for local data, where builder is "text", "json" or "parquet" and files
    are the non-empty input files in order; or None when `data_path_or_name` names a hub data set.
    Raises BookcorpusError for a missing path, an unsupported file type, or a directory without
    (or with mixed kinds of) data files.
    """
    path = Path(data_path_or_name).expanduser()
    flag = f"--data_path_or_name {data_path_or_name}"
    if not path.exists():
        if _looks_like_path(data_path_or_name):
            raise BookcorpusError(
                f"{flag}: no such file or directory ({path.resolve()}); check the path, or pass a "
                f"Hugging Face hub data set name such as bookcorpus/bookcorpus"
            )
        return None  # a hub name

    supported = ", ".join(sorted(BUILDER_BY_EXTENSION))
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDER_BY_EXTENSION),
            key=lambda p: p.name,
        )
        if not files:
            raise BookcorpusError(
                f"{flag}: the directory has no data files (looked for {supported}); "
                f"put the corpus files in it or pass one file"
            )
        builders = {BUILDER_BY_EXTENSION[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            kinds = ", ".join(sorted({p.suffix.lower() for p in files}))
            raise BookcorpusError(
                f"{flag}: the directory mixes file types ({kinds}); keep files of one type "
                f"(.json and .jsonl count as one) in it, or pass the files' directory for each type separately"
            )
        builder = builders.pop()
    else:
        builder = BUILDER_BY_EXTENSION.get(path.suffix.lower())
        if builder is None:
            raise BookcorpusError(
                f"{flag}: unsupported file type {path.suffix or '(no extension)'!r}; "
                f"use one of {supported}, or a directory of such files"
            )
        files = [path]
    return builder, [str(p) for p in files if _has_content(p, builder)]


def check_utf8(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> None:
    """BookcorpusError naming the file, line and column of the first byte sequence of `path` that is
    not UTF-8. Reads the file in chunks of `chunk_bytes` (bounded memory, about a second per GB).

    Text and JSON input must be UTF-8: the text builder fails without saying where, and the JSON
    reader keeps the bad bytes, which fail later inside a worker."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line, column = 1, 0  # the line of the next byte, and the bytes of that line before it
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = decoder.getstate()[0]  # the bytes of an unfinished character from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = pending + chunk
                before = data[: e.start]
                newlines = before.count(b"\n")
                col = (len(before) - before.rfind(b"\n") - 1) if newlines else column - len(pending) + len(before)
                bad = data[e.start : e.start + 1].hex() or "end of file"
                raise BookcorpusError(
                    f"{path}: line {line + newlines}, byte {col + 1} is not valid UTF-8 (byte 0x{bad}: "
                    f"{e.reason}); --data_path_or_name must be UTF-8 text: convert the file, e.g. "
                    f"`iconv -f latin1 -t utf-8 FILE > FILE.utf8`"
                ) from None
            if not chunk:
                return
            newlines = chunk.count(b"\n")
            line += newlines
            column = (len(chunk) - chunk.rfind(b"\n") - 1) if newlines else column + len(chunk)


def _empty_dataset_error(data_path_or_name: str, detail: str) -> BookcorpusError:
    return BookcorpusError(
        f"--data_path_or_name {data_path_or_name}: the data set is empty ({detail}); "
        f"there is nothing to tokenize, so point it at data that has text"
    )


def load_hub_train_split(data_path_or_name: str) -> datasets.Dataset:
    """The train split of a Hugging Face hub data set named by --data_path_or_name (what is not a
    local path); a failure (no network, no such data set, no train split) is one BookcorpusError."""
    try:
        return datasets.load_dataset(data_path_or_name, split="train")
    except Exception as e:  # no network, no such data set, no "train" split, ...
        raise BookcorpusError(
            f"--data_path_or_name {data_path_or_name}: not a local path, and loading it from the Hugging Face "
            f"hub failed ({type(e).__name__}: {e}); pass an existing local file or directory, or a hub data "
            f"set name with a train split"
        ) from e


def load_documents(
    data_path_or_name: str, text_column: str = "text", num_proc: Optional[int] = None
) -> datasets.Dataset:
    """Load the documents as a Dataset with (at least) the column `text_column`, in input order.

    Local .txt input yields one document per line with non-whitespace text. Raises BookcorpusError
    when the path is missing, the column is missing or not text, or there are no documents.
    """
    resolved = resolve_data_files(data_path_or_name)
    flag = f"--data_path_or_name {data_path_or_name}"
    if resolved is None:
        documents = load_hub_train_split(data_path_or_name)
    else:
        builder, files = resolved
        if not files:
            raise _empty_dataset_error(data_path_or_name, "no documents: the input files are empty")
        if builder in ("text", "json"):
            for file in files:
                check_utf8(file)
        try:
            documents = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as e:
            # Typical causes: malformed JSON, a file that is not parquet, parquet files whose
            # schemas differ. str(e) of a bare StopIteration is empty, so name the type too.
            raise BookcorpusError(
                f"{flag}: could not read it as {builder} ({type(e).__name__}: {e}); "
                f"check that the files are valid {builder} files"
            ) from e

    if text_column not in documents.column_names:
        present = ", ".join(repr(c) for c in documents.column_names) or "(none)"
        raise BookcorpusError(
            f"--text_column {text_column}: no column {text_column!r} in {data_path_or_name}; "
            f"the columns present are {present}; pass --text_column with the one that holds the text"
        )
    feature = documents.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise BookcorpusError(
            f"--text_column {text_column}: column {text_column!r} of {data_path_or_name} holds {feature}, "
            f"not text; pass --text_column with the column that holds the text"
        )

    if resolved is not None and resolved[0] == "text":
        # The text builder keeps blank lines as empty documents; a blank line separates documents,
        # it is not one. The filter keeps order.
        documents = documents.filter(
            lambda batch: [bool(line.strip()) for line in batch[text_column]],
            batched=True,
            batch_size=BATCH_SIZE,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            desc="Dropping blank lines",
        )

    if len(documents) == 0:
        raise _empty_dataset_error(data_path_or_name, "no documents")
    # A null in the text column would make the tokenizer fail deep inside a worker process.
    null_count = documents.data.column(text_column).null_count
    if null_count:
        raise BookcorpusError(
            f"--text_column {text_column}: {null_count} rows of {data_path_or_name} have no text "
            f"(null) in column {text_column!r}; remove those rows or fill them with text"
        )
    return documents


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_path_or_name: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained(tokenizer_path_or_name), with errors in our words. Code shipped
    with the tokenizer runs only with trust_remote_code (--trust_remote_code); transformers is told
    so explicitly, so it neither runs it nor asks on the terminal."""
    flag = f"--tokenizer_path_or_name {tokenizer_path_or_name}"
    path = Path(tokenizer_path_or_name).expanduser()
    if not path.exists() and _looks_like_path(tokenizer_path_or_name):
        raise BookcorpusError(
            f"{flag}: no such directory ({path.resolve()}); check the path, or pass a Hugging Face "
            f"hub model id such as deepseek-ai/DeepSeek-Coder-V2-Lite-Base"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else tokenizer_path_or_name,
                                                  trust_remote_code=trust_remote_code)
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        raise BookcorpusError(
            f"{flag}: could not load a tokenizer ({type(e).__name__}: {detail}); pass a directory "
            f"written by save_pretrained (with tokenizer.json or tokenizer_config.json) or a hub model id"
            f"{'' if trust_remote_code else ' (one that needs its own code also needs --trust_remote_code)'}"
        ) from None
    # We tokenize whole documents, which may be longer than the model's context; that is fine
    # because the stream is cut into rows afterwards. Raise the limit so transformers does not
    # warn about "indexing errors" that cannot happen here.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def special_token_ids(tokenizer, tokenizer_name: str = "the tokenizer") -> tuple[int, int]:
    """(bos_token_id, eos_token_id) of the tokenizer; BookcorpusError naming the one that is missing."""
    ids = []
    for kind in ("bos", "eos"):
        token = getattr(tokenizer, f"{kind}_token")
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token is None or token_id is None:
            where = "start" if kind == "bos" else "end"
            raise BookcorpusError(
                f"--tokenizer_path_or_name {tokenizer_name}: the tokenizer has no {kind.upper()} token "
                f"({kind}_token is {'not set' if token is None else repr(token) + ' but it is not in the vocabulary'}), "
                f"and every document must {where} with one; use a tokenizer that defines {kind}_token "
                f"(set \"{kind}_token\" in its tokenizer_config.json)"
            )
        ids.append(int(token_id))
    return ids[0], ids[1]


# --------------------------------------------------------------------------------------------
# Tokenize, concatenate, chunk, save
# --------------------------------------------------------------------------------------------


def _pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` as consecutive pieces of at most `limit` characters that join back to it (see PIECE_CHARS)."""
    if len(text) <= limit:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > limit:
        end = start + limit
        cut = text.rfind(" ", start + 1, end + 1)
        while cut > start and (text[cut - 1].isspace() or (cut + 1 < n and text[cut + 1].isspace())):
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:  # no space between words: any whitespace, else a forced cut
            cut = max(text.rfind(c, start + 1, end + 1) for c in "\n\t\r\f\v")
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_bounded(tokenizer, texts: list[str], piece_chars: int = PIECE_CHARS, call_chars: int = CALL_CHARS):
    """The token ids (int32 arrays, no special tokens) of each text, with at most `call_chars`
    characters per tokenizer call and long texts in pieces of at most `piece_chars` (PIECE_CHARS)."""
    parts = [[] for _ in texts]
    group, owners, chars = [], [], 0

    def flush():
        if group:
            # add_special_tokens=False: _tokenize_batch is the one place that adds BOS/EOS; a tokenizer
            # whose post-processor also adds BOS (Llama-style) would otherwise put two at the start.
            for owner, ids in zip(owners, tokenizer(group, add_special_tokens=False)["input_ids"]):
                parts[owner].append(np.asarray(ids, dtype=np.int32))
            group.clear()
            owners.clear()

    for i, text in enumerate(texts):
        for piece in _pieces(text, piece_chars):
            if group and chars + len(piece) > call_chars:
                flush()
                chars = 0
            group.append(piece)
            owners.append(i)
            chars += len(piece)
    flush()
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]


def _tokenize_batch(batch, tokenizer, text_column: str, bos_id: int, eos_id: int) -> dict:
    """Map function: each text -> [bos] + its tokens + [eos]. Module-level so worker processes get it."""
    ends = np.array([bos_id], dtype=np.int32), np.array([eos_id], dtype=np.int32)
    return {"input_ids": [np.concatenate([ends[0], ids, ends[1]]) for ids in encode_bounded(tokenizer, batch[text_column])]}


def tokenize_documents(
    documents: datasets.Dataset,
    tokenizer,
    text_column: str = "text",
    num_proc: Optional[int] = None,
    tokenizer_name: str = "the tokenizer",
) -> datasets.Dataset:
    """One row per document with column input_ids = [bos] + tokens + [eos], in document order.

    Dataset.map with num_proc splits the rows into contiguous shards and concatenates the results
    in shard order, so the order of documents is kept for any num_proc.
    """
    bos_id, eos_id = special_token_ids(tokenizer, tokenizer_name)
    return documents.map(
        _tokenize_batch,
        batched=True,
        batch_size=BATCH_SIZE,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "bos_id": bos_id, "eos_id": eos_id},
        remove_columns=documents.column_names,
        features=OUTPUT_FEATURES,
        desc="Tokenizing",
    )


def _write_rows(tokenized: datasets.Dataset, sequence_length: int, arrow_path: str) -> ChunkStats:
    """Cut the concatenated token stream of `tokenized` into rows, written as an Arrow stream file.

    One sequential pass with a carry buffer: each batch's tokens are appended to the tokens left
    over from the previous batch, every full row is written, and the rest (< sequence_length
    tokens) is carried into the next batch. So rows cross document and batch boundaries exactly as
    in one long stream, which a batched map over independent batches could not do.
    """
    n = sequence_length
    # Write at most ~16M tokens per record batch: bounded memory, and int32 list offsets never overflow.
    rows_per_write = max(1, (1 << 24) // n)
    schema = OUTPUT_FEATURES.arrow_schema
    carry = np.empty(0, dtype=np.int32)
    n_tokens = 0
    n_rows = 0
    with pa.OSFile(arrow_path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, tqdm(
        total=len(tokenized), desc="Chunking", unit=" examples"
    ) as progress:
        # The arrow format hands us zero-copy pyarrow Tables instead of Python lists.
        for table in tokenized.with_format("arrow").iter(batch_size=BATCH_SIZE):
            # list_flatten respects slicing (a batch's list offsets need not start at 0).
            values = pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int32, copy=False)
            n_tokens += len(values)
            stream = np.concatenate([carry, values])
            full_rows = len(stream) // n
            for start in range(0, full_rows, rows_per_write):
                count = min(rows_per_write, full_rows - start)
                flat = stream[start * n : (start + count) * n]
                offsets = pa.array(np.arange(0, (count + 1) * n, n, dtype=np.int32))
                column = pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.int32()))
                writer.write_batch(pa.record_batch([column], schema=schema))
            n_rows += full_rows
            carry = stream[full_rows * n :]
            progress.update(table.num_rows)
    return ChunkStats(
        documents=len(tokenized),
        tokens=n_tokens,
        rows=n_rows,
        sequence_length=n,
        remainder=len(carry),
    )


def check_save_path(save_path: str | os.PathLike) -> Path:
    """`save_path` as a Path, if save_to_disk can write a directory there: it is a directory or does
    not exist, and its nearest existing ancestor is a writable directory. BookcorpusError otherwise."""
    path = Path(save_path).expanduser()
    if path.exists() and not path.is_dir():
        raise BookcorpusError(f"--save_path {save_path} is a file, but the rows are saved as a directory "
                              f"(save_to_disk); pass a new or existing directory path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BookcorpusError(f"--save_path {save_path}: {ancestor} is a file, so no directory can be made below "
                              f"it; pass a path in a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BookcorpusError(f"--save_path {save_path}: {ancestor} is not writable; pass a path in a writable "
                              f"directory")
    return path


def save_rows(arrow_path, save_path):
    """The rows of the Arrow file `arrow_path` saved with save_to_disk at `save_path` (a failure to
    write is one line naming --save_path); the file's memory map is closed before returning, so the
    caller may remove it."""
    rows = datasets.Dataset.from_file(arrow_path)
    try:
        rows.save_to_disk(str(save_path))
    except OSError as e:  # disk full, permissions, a file in the way
        raise BookcorpusError(f"--save_path {save_path}: could not write the rows ({type(e).__name__}: "
                              f"{e.strerror or e}); free space or pass another directory") from None
    finally:
        del rows  # close the memory map before the temporary file is removed


def tokenize_and_chunk(
    documents: datasets.Dataset,
    tokenizer,
    sequence_length: int,
    save_path: str | os.PathLike,
    text_column: str = "text",
    num_proc: Optional[int] = None,
    tokenizer_name: str = "the tokenizer",
) -> ChunkStats:
    """Tokenize `documents`, concatenate [bos]+tokens+[eos] of each, cut into rows, save to `save_path`.

    The saved data set has one column input_ids (int32) whose rows all have `sequence_length`
    tokens. Raises BookcorpusError when the tokenizer lacks BOS or EOS, sequence_length < 2, or the
    documents hold fewer than sequence_length tokens (no row can be made); nothing is written then.
    """
    if sequence_length < 2:
        raise BookcorpusError(
            f"--sequence_length must be at least 2 (got {sequence_length}): a training row needs an "
            f"input token and a next token to predict; pass e.g. --sequence_length 2048"
        )
    if len(documents) == 0:
        raise BookcorpusError("the data set is empty (no documents); there is nothing to tokenize")
    tokenized = tokenize_documents(documents, tokenizer, text_column, num_proc, tokenizer_name)

    save_path = check_save_path(save_path)
    try:
        save_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BookcorpusError(f"--save_path {save_path}: cannot create its parent directory ({e.strerror}); "
                              f"pass a path in a writable directory") from None
    # The rows go to a temporary Arrow file next to the output (same disk), which save_to_disk then
    # copies into its own layout. Dataset.from_generator would do the same but caches by a hash of
    # the generator, which could hand back stale rows; here nothing is cached.
    with tempfile.TemporaryDirectory(dir=save_path.parent, prefix=".bookcorpus-tmp-") as tmp_dir:
        arrow_path = os.path.join(tmp_dir, "rows.arrow")
        stats = _write_rows(tokenized, sequence_length, arrow_path)
        if stats.rows == 0:
            raise BookcorpusError(
                f"the data set is too small: its {stats.documents} documents make only {stats.tokens} "
                f"tokens (BOS and EOS included), fewer than --sequence_length {sequence_length}, so no "
                f"row can be made; pass a smaller --sequence_length or more data"
            )
        save_rows(arrow_path, save_path)
    return stats


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bookcorpus.py",
        description=(
            "Tokenize a text corpus for pre-training: every document becomes [BOS] + tokens + [EOS], "
            "the documents are concatenated in order, and the token stream is cut into rows of exactly "
            "--sequence_length tokens (the final remainder shorter than a row is dropped). The rows are "
            "saved with datasets' save_to_disk as one int32 column 'input_ids'. With --format sft: "
            "instruction examples, rendered as chat, only the responses labelled, packed into rows."
        ),
        epilog=(
            "example: python bookcorpus.py --data_path_or_name bookcorpus/bookcorpus "
            "--tokenizer_path_or_name deepseek-ai/DeepSeek-Coder-V2-Lite-Base "
            "--save_path ./bookcorpus_2k --sequence_length 2048 --num_proc 16"
        ),
    )
    parser.add_argument(
        "--data_path_or_name",
        required=True,
        metavar="X",
        help=(
            "the corpus: a local .txt file (one document per non-empty line), .jsonl/.json file (one "
            "JSON object per line), .parquet file, or a directory of such files of one type (read in "
            "name order); anything that does not exist locally and does not look like a path (./, /, "
            "~ or a file extension) is loaded from the Hugging Face hub with load_dataset(X, split='train')"
        ),
    )
    parser.add_argument(
        "--tokenizer_path_or_name",
        required=True,
        metavar="T",
        help=(
            "tokenizer directory or Hugging Face hub model id, loaded with AutoTokenizer.from_pretrained; "
            "it must define a BOS and an EOS token"
        ),
    )
    parser.add_argument(
        "--save_path",
        required=True,
        metavar="S",
        help="output directory for Dataset.save_to_disk (read it back with datasets.load_from_disk)",
    )
    parser.add_argument(
        "--sequence_length",
        required=True,
        type=int,
        metavar="N",
        help="tokens per output row, at least 2 (e.g. 2048); the model trains on rows of this length",
    )
    parser.add_argument(
        "--num_proc",
        type=int,
        default=1,
        metavar="K",
        help="processes for tokenizing (default 1); the output is the same for any K",
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help=(
            "let a hub tokenizer run its own Python code (transformers' trust_remote_code); without it no "
            "code from the hub runs, and a tokenizer that needs its own code is refused"
        ),
    )
    parser.add_argument(
        "--text_column",
        default="text",
        help="column that holds the document text in .jsonl/.json/.parquet/hub data (default: text; "
        "--format text only)",
    )
    parser.add_argument(
        "--format",
        choices=("text", "sft"),
        default="text",
        help=(
            "text (default): pretraining documents, concatenated and cut into rows (column input_ids); "
            "sft: instruction examples ('instruction'/'output' with optional 'input' and 'system', or "
            "'messages' [{role, content}]), rendered with the tokenizer's chat_template or else the "
            "DeepSeek format (User: ...\\n\\nAssistant: ...<EOS>), saved as input_ids, labels (-100 "
            "except the responses and their EOS) and position_ids (restarting at every example); see sft_data.py"
        ),
    )
    parser.add_argument(
        "--packing",
        choices=("on", "off"),
        default=None,
        help=(
            "--format sft only: on (default) packs whole examples greedily in order into each row "
            "(an example never crosses rows); off puts one example per row, padded. Either way the "
            "position_ids restart inside rows: train with a plan compiled with --document_masking on"
        ),
    )
    parser.add_argument(
        "--drop_long",
        action="store_true",
        help=(
            "--format sft only: drop examples longer than --sequence_length tokens instead of cutting "
            "them to their first --sequence_length tokens (both are counted in the summary)"
        ),
    )
    return parser


def _main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; BookcorpusError for bad input (main prints it and exits 2, as argparse does for
    its own errors)."""
    args = build_parser().parse_args(argv)
    # Cheap checks first, so a typo fails before minutes of tokenizing.
    if args.sequence_length < 2:
        raise BookcorpusError(
            f"--sequence_length must be at least 2 (got {args.sequence_length}): a training row "
            f"needs an input token and a next token to predict; pass e.g. --sequence_length 2048"
        )
    if args.num_proc < 1:
        raise BookcorpusError(f"--num_proc must be at least 1 (got {args.num_proc})")
    if args.format != "sft":
        for flag, given in (("--packing", args.packing is not None), ("--drop_long", args.drop_long)):
            if given:
                raise BookcorpusError(f"{flag} applies to --format sft only (pretraining text is always "
                                      f"concatenated and cut into rows); add --format sft, or leave out {flag}")
    resolve_data_files(args.data_path_or_name)  # a missing path fails here, before the tokenizer loads
    check_save_path(args.save_path)
    tokenizer = load_tokenizer(args.tokenizer_path_or_name, args.trust_remote_code)
    special_token_ids(tokenizer, args.tokenizer_path_or_name)
    if args.format == "sft":
        import sft_data  # here, not at the top: sft_data builds on this module

        stats = sft_data.prepare_sft(
            args.data_path_or_name,
            tokenizer,
            args.sequence_length,
            args.save_path,
            packing=args.packing != "off",
            drop_long=args.drop_long,
            num_proc=args.num_proc,
            tokenizer_name=args.tokenizer_path_or_name,
        )
        print(stats.summary(args.save_path))
        return 0
    documents = load_documents(args.data_path_or_name, args.text_column, args.num_proc)
    stats = tokenize_and_chunk(
        documents,
        tokenizer,
        args.sequence_length,
        args.save_path,
        text_column=args.text_column,
        num_proc=args.num_proc,
        tokenizer_name=args.tokenizer_path_or_name,
    )
    print(stats.summary(args.save_path))
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one line naming the problem and the fix."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
