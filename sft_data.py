"""Prepare an instruction-tuning (SFT) data set: render conversations, label the responses, pack rows.

This is the work behind ``bookcorpus.py --format sft`` (bookcorpus.py keeps the command line):

    python bookcorpus.py --format sft --data_path_or_name alpaca.jsonl \\
        --tokenizer_path_or_name deepseek-ai/DeepSeek-V2-Lite-Chat --save_path ./alpaca_2k \\
        --sequence_length 2048 [--packing on|off] [--drop_long] [--num_proc K]

Input: local ``.jsonl`` / ``.json`` (JSON lines or one JSON array) / ``.parquet`` files, a directory
of them, or a hub data set name, as for pretraining text. Each row is one example, either

* ``{"instruction": ..., "output": ..., "input": optional, "system": optional}``: the prompt is the
  instruction, followed by ``"\\n\\n"`` and the input when there is one; or
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``: a conversation;
  every assistant turn is a response to learn (multi-turn: labels on each).

Rendering. With the tokenizer's ``chat_template`` when it has one, else the DeepSeek format (the one
DeepSeek's chat models use): BOS, then per turn ``{system}\\n\\n``, ``User: {content}\\n\\n`` or
``Assistant: {content}<EOS>``. Labels are -100 everywhere except each assistant response and the
EOS after it. The prompt part of a response turn ends at the generation prompt (``Assistant:`` in the
DeepSeek format, without the space), because that is where a chat front end stops and the model
starts writing: the model learns to produce the space and the text, as it must at inference.

Finding the responses under a chat_template: the template is rendered for growing prefixes of the
conversation. For assistant turn k, ``render(messages[:k], add_generation_prompt=True)`` is the
prompt and what ``render(messages[:k+1])`` adds to it is the response (its end-of-turn tokens
included); each rendering must start with the previous one, else the row is refused (a template
that rewrites earlier turns, e.g. one that drops old reasoning, has no fixed response spans). For
a template that ignores add_generation_prompt, and for a conversation that opens with the
assistant (transformers cannot render the empty prompt before it), the text before the response's
content (its turn header, less the spaces just before the content) is moved into the prompt. The
text pieces are tokenized one by one (``add_special_tokens=False``,
special-token texts such as the template's BOS become those tokens) and their ids concatenated, so
the prompt tokens of the first turn are exactly those a chat front end feeds the model.

Rows (``--sequence_length`` tokens each), saved with ``save_to_disk`` as int32 columns
``input_ids``, ``labels`` (not shifted: the loss trains position s to predict labels[s + 1]) and
``position_ids`` (0, 1, ... restarting at every example, so attention can be masked per example):

* ``--packing on`` (default): examples are packed greedily in input order; an example that does not
  fit in what is left of the row starts the next row (no example is split across rows);
* ``--packing off``: one example per row.

The rest of a row is padding (the tokenizer's pad id, else EOS; labels -100), a final segment whose
positions restart at 0. An example longer than a row is cut to its first ``--sequence_length``
tokens, or dropped with ``--drop_long``; one whose cut leaves no response token is dropped. The first
token of every example is never a target (label -100): nothing of its own example precedes it.

A bad row raises ``BookcorpusError`` naming the file, the row (``line N`` of JSON lines, counted from
1; ``row N`` of JSON arrays, parquet and hub data, counted from 0 as datasets and pandas do) and the
field.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

import bookcorpus
from bookcorpus import BookcorpusError

# Label of a token that is not a target (PyTorch's cross_entropy ignore_index default).
IGNORE_INDEX = -100

SFT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "position_ids": datasets.List(datasets.Value("int32")),
    }
)

ROLES = ("system", "user", "assistant")

# Between an instruction and its optional input (the Alpaca convention).
INSTRUCTION_INPUT_SEPARATOR = "\n\n"

# Examples per tokenizer call (and per task of a worker process with --num_proc).
BATCH_SIZE = 256

RECORD_FIX = ("give every example 'instruction' and 'output' (optionally 'input' and 'system'), or "
              "'messages': a list of {'role': 'system' | 'user' | 'assistant', 'content': text}")


# --------------------------------------------------------------------------------------------
# Input: the example records, each with the place it came from
# --------------------------------------------------------------------------------------------


class SftSource:
    """The example records of `data_path_or_name`, in input order, as (where, record) pairs.

    `where` names the file and row ("data.jsonl, line 3", "data.parquet, row 2", "org/name, row 7")
    for error messages. JSON lines are read one line at a time (bounded memory); a JSON array file
    is read whole. len() is the number of records (one counting pass over JSON lines files).
    """

    def __init__(self, data_path_or_name: str):
        self.name = data_path_or_name
        flag = f"--data_path_or_name {data_path_or_name}"
        resolved = bookcorpus.resolve_data_files(data_path_or_name)
        self.hub_rows = None
        self.builder, self.files = None, []
        if resolved is None:
            self.hub_rows = bookcorpus.load_hub_train_split(data_path_or_name)
        else:
            self.builder, self.files = resolved
            if self.builder == "text":
                raise BookcorpusError(
                    f"{flag}: --format sft reads examples from .jsonl, .json or .parquet files, not .txt; "
                    f"write one JSON object per example ({{\"instruction\": ..., \"output\": ...}} or "
                    f"{{\"messages\": [...]}}), or leave out --format sft to prepare pretraining text"
                )
            if not self.files:
                raise bookcorpus._empty_dataset_error(data_path_or_name, "no examples: the input files are empty")
            if self.builder == "json":
                for file in self.files:
                    bookcorpus.check_utf8(file)
        self._arrays: dict[str, list] = {}  # JSON array files, parsed once for len() and iteration
        self._length: Optional[int] = None

    def __len__(self) -> int:
        if self._length is None:
            if self.hub_rows is not None:
                self._length = len(self.hub_rows)
            else:
                self._length = sum(self._count(file) for file in self.files)
        return self._length

    def __iter__(self) -> Iterator[tuple[str, object]]:
        if self.hub_rows is not None:
            for i, record in enumerate(self.hub_rows):
                yield f"{self.name}, row {i}", record
            return
        for file in self.files:
            if self.builder == "parquet":
                yield from self._parquet_records(file)
            elif self._is_json_array(file):
                for i, record in enumerate(self._json_array(file)):
                    yield f"{file}, row {i}", record
            else:
                yield from self._json_lines_records(file)

    def _count(self, file: str) -> int:
        if self.builder == "parquet":
            return self._parquet_file(file).metadata.num_rows
        if self._is_json_array(file):
            return len(self._json_array(file))
        with open(file, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

    @staticmethod
    def _is_json_array(file: str) -> bool:
        """A .json file whose first non-blank character is '[' holds one JSON array; every other
        JSON file is JSON lines (the json builder of datasets reads both kinds the same way)."""
        if not file.lower().endswith(".json"):
            return False
        with open(file, encoding="utf-8") as f:
            while chunk := f.read(1 << 16):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[0] == "["
        return False

    def _json_array(self, file: str) -> list:
        if file not in self._arrays:
            with open(file, encoding="utf-8") as f:
                try:
                    self._arrays[file] = json.load(f)
                except json.JSONDecodeError as e:
                    raise BookcorpusError(
                        f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); write one JSON "
                        f"array of example objects, or one JSON object per line"
                    ) from None
        return self._arrays[file]

    @staticmethod
    def _json_lines_records(file: str) -> Iterator[tuple[str, object]]:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BookcorpusError(
                        f"{file}, line {number}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
                        f"object per line, e.g. {{\"instruction\": \"...\", \"output\": \"...\"}}"
                    ) from None
                yield f"{file}, line {number}", record

    @staticmethod
    def _parquet_file(file: str):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file)
        except Exception as e:
            raise BookcorpusError(f"{file}: could not read it as parquet ({type(e).__name__}: {e}); check that "
                                  f"it is a valid parquet file") from None

    def _parquet_records(self, file: str) -> Iterator[tuple[str, object]]:
        row = 0
        for batch in self._parquet_file(file).iter_batches(batch_size=BATCH_SIZE):
            for record in batch.to_pylist():
                yield f"{file}, row {row}", record
                row += 1


# --------------------------------------------------------------------------------------------
# Records -> conversations
# --------------------------------------------------------------------------------------------


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _text_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise BookcorpusError(f"{where}, field '{key}': holds {_type_name(value)}, not text; {RECORD_FIX}")
    return value


def conversation_of(record, where: str) -> tuple[list[dict], list[str]]:
    """The example `record` as messages [{"role", "content"}], ending with its last assistant turn,
    and the name of the record's field each message comes from (for later error messages).

    Turns after the last assistant turn are left out: nothing is learned from them, and they would
    only take room in the row. A missing field and a null one are the same (parquet and hub rows
    have every column, null where a row lacks it). BookcorpusError naming `where` and the field for
    a record that is not an example."""
    if not isinstance(record, dict):
        raise BookcorpusError(f"{where}: the example is {_type_name(record)}, not an object; {RECORD_FIX}")

    def present(key):
        return record.get(key) is not None

    if present("messages"):
        clashing = [key for key in ("instruction", "output") if present(key)]
        if clashing:
            raise BookcorpusError(f"{where}, field '{clashing[0]}': the example has both 'messages' and "
                                  f"'{clashing[0]}'; give each example one form, either 'messages' or "
                                  f"'instruction' and 'output'")
        messages = _messages_of(record["messages"], where)
        return messages, [f"messages[{i}]" for i in range(len(messages))]

    if not present("instruction") and not present("output"):
        fields = ", ".join(repr(k) for k in record) or "none"
        raise BookcorpusError(f"{where}: no field 'messages', 'instruction' or 'output' (fields: {fields}); "
                              f"{RECORD_FIX}")
    for key, other in (("instruction", "output"), ("output", "instruction")):
        if not present(key):
            raise BookcorpusError(f"{where}, field '{key}': missing (the example has '{other}'); {RECORD_FIX}")
    instruction = _text_field(record, "instruction", where)
    output = _text_field(record, "output", where)
    extra = _text_field(record, "input", where) if present("input") else ""
    system = _text_field(record, "system", where) if present("system") else ""
    if not output.strip():
        raise BookcorpusError(f"{where}, field 'output': empty; an example needs a response to train on: "
                              f"write it, or remove the row")
    prompt = INSTRUCTION_INPUT_SEPARATOR.join(part for part in (instruction, extra) if part.strip())
    if not prompt:
        raise BookcorpusError(f"{where}, field 'instruction': empty (and no 'input'); an example needs a prompt: "
                              f"write it, or remove the row")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    fields = ["instruction", "output"]
    if system.strip():
        messages, fields = [{"role": "system", "content": system}] + messages, ["system"] + fields
    return messages, fields


def _messages_of(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else _type_name(value)
        raise BookcorpusError(f"{where}, field 'messages': holds {kind}, not a list of turns; {RECORD_FIX}")
    messages = []
    for i, turn in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise BookcorpusError(f"{where}, field '{field}': holds {_type_name(turn)}, not an object "
                                  f"{{'role', 'content'}}; {RECORD_FIX}")
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            hint = " (ShareGPT's 'from'/'value' are 'role'/'content' here)" if "from" in turn else ""
            raise BookcorpusError(f"{where}, field '{field}.role': missing{hint}; give every turn a 'role' of "
                                  f"'system', 'user' or 'assistant'")
        if role not in ROLES:
            raise BookcorpusError(f"{where}, field '{field}.role': {role!r} is not 'system', 'user' or "
                                  f"'assistant'; rename it (ShareGPT's 'human' is 'user', 'gpt' is 'assistant')")
        if content is None:
            raise BookcorpusError(f"{where}, field '{field}.content': missing; give every turn its text as 'content'")
        if not isinstance(content, str):
            raise BookcorpusError(f"{where}, field '{field}.content': holds {_type_name(content)}, not text; "
                                  f"give every turn its text as 'content'")
        if role == "assistant" and not content.strip():
            raise BookcorpusError(f"{where}, field '{field}.content': an empty assistant turn; every response "
                                  f"needs text to train on: write it, or remove the turn")
        messages.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        roles = ", ".join(m["role"] for m in messages)
        raise BookcorpusError(f"{where}, field 'messages': no assistant turn (roles: {roles}); an example needs "
                              f"a response to train on: add it, or remove the row")
    return messages[: last + 1]


# --------------------------------------------------------------------------------------------
# Conversations -> pieces of text (or token ids), each a target or not
# --------------------------------------------------------------------------------------------

# A piece of an example: text to tokenize or token ids, and whether its tokens are targets.
Piece = tuple[Union[str, list[int]], bool]


class DeepSeekFormat:
    """BOS, then per turn ``{system}\\n\\n``, ``User: {content}\\n\\n`` or ``Assistant: {content}<EOS>``,
    the format of DeepSeek's chat models (their chat_template renders the same text). Used when the
    tokenizer has no chat_template."""

    description = "the DeepSeek format (the tokenizer has no chat_template)"

    def __init__(self, bos_id: int, eos_id: int):
        self.bos_id, self.eos_id = bos_id, eos_id

    def pieces(self, messages: list[dict], fields: list[str], where: str) -> list[Piece]:
        pieces: list[Piece] = [([self.bos_id], False)]
        prompt = ""  # the text since the last response
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                prompt += content + "\n\n"
            elif role == "user":
                prompt += "User: " + content + "\n\n"
            else:
                # "Assistant:" is the generation prompt; the space belongs to the response (see the
                # module docstring).
                pieces += [(prompt + "Assistant:", False), (" " + content, True), ([self.eos_id], True)]
                prompt = ""
        return pieces  # conversation_of ends every conversation with an assistant turn


class ChatTemplateFormat:
    """The tokenizer's chat_template, the responses found by rendering growing prefixes (see the
    module docstring)."""

    description = "the tokenizer's chat_template"

    def __init__(self, tokenizer, tokenizer_name: str = "the tokenizer"):
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "Hello"}]
        where = f"--tokenizer_path_or_name {tokenizer_name}"
        # A template that ignores add_generation_prompt renders no assistant header for the prompt;
        # its headers are then found in front of each response's content instead.
        probe_name = "a conversation of one user turn"
        self.has_generation_prompt = (self._render(probe, True, where, probe_name)
                                      != self._render(probe, False, where, probe_name))

    def _render(self, messages: list[dict], add_generation_prompt: bool, where: str,
                conversation: str = "this conversation") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja's TemplateError (raise_exception in the template), KeyError, ...
            detail = " ".join(str(e).split())[:300]
            raise BookcorpusError(f"{where}: the tokenizer's chat_template failed on {conversation} "
                                  f"({type(e).__name__}: {detail}); fix the conversation (e.g. the order of its "
                                  f"roles) or the template") from None

    def pieces(self, messages: list[dict], fields: list[str], where: str) -> list[Piece]:
        """`fields[k]` names the record field of messages[k], for the error messages."""
        pieces: list[Piece] = []
        done = ""  # the rendering of the conversation up to the last response placed in pieces
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            full = self._render(messages[: k + 1], False, where)
            # transformers 4.40 cannot render an empty conversation, so a conversation that opens
            # with the assistant has no rendered prompt: its header is found by its content below.
            prompt = self._render(messages[:k], True, where) if k else ""
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise BookcorpusError(
                    f"{where}, field '{fields[k]}': the tokenizer's chat_template does not render this "
                    f"conversation as growing prefixes (the rendering up to this assistant turn is not the "
                    f"start of the rendering with it), so its response cannot be located; use a template "
                    f"that renders each turn the same whatever follows it, or split a multi-turn "
                    f"conversation into one example per assistant turn"
                )
            response = full[len(prompt):]
            if not self.has_generation_prompt or not k:
                start = response.find(message["content"].strip())
                # Spaces just before the content stay in the response, as after a generation
                # prompt (DeepSeek's "Assistant:" is followed by the response's " text").
                while start > 0 and response[start - 1] == " ":
                    start -= 1
                if start > 0 and response[:start].strip():  # a header (not just a space) before the content
                    prompt, response = prompt + response[:start], response[start:]
            if not response:
                raise BookcorpusError(f"{where}, field '{fields[k]}': the tokenizer's chat_template renders "
                                      f"nothing for this assistant turn; use a template that renders responses")
            pieces += [(prompt[len(done):], False), (response, True)]
            done = full
        return pieces


def chat_format(tokenizer, tokenizer_name: str = "the tokenizer"):
    """ChatTemplateFormat when the tokenizer has a chat_template, else DeepSeekFormat. (transformers'
    class-level default templates do not count: only one the tokenizer itself carries.)"""
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplateFormat(tokenizer, tokenizer_name)
    return DeepSeekFormat(*bookcorpus.special_token_ids(tokenizer, tokenizer_name))


# --------------------------------------------------------------------------------------------
# Conversations -> token ids and labels
# --------------------------------------------------------------------------------------------


class SftEncoder:
    """Records -> (input_ids, labels) int32 arrays, one pair per record, in order."""

    def __init__(self, tokenizer, renderer):
        self.tokenizer, self.renderer = tokenizer, renderer

    def encode(self, batch: list[tuple[str, object]]) -> list[tuple[np.ndarray, np.ndarray]]:
        examples = [self.renderer.pieces(*conversation_of(record, where), where=where) for where, record in batch]
        # One tokenizer call for all texts of the batch (bounded in size, see bookcorpus.encode_bounded).
        texts = [piece for pieces in examples for piece, _ in pieces if isinstance(piece, str)]
        encoded = iter(bookcorpus.encode_bounded(self.tokenizer, texts) if texts else [])
        out = []
        for pieces in examples:
            ids = [np.asarray(next(encoded) if isinstance(piece, str) else piece, dtype=np.int32)
                   for piece, _ in pieces]
            labels = [part if target else np.full(len(part), IGNORE_INDEX, dtype=np.int32)
                      for part, (_, target) in zip(ids, pieces)]
            ids, labels = np.concatenate(ids), np.concatenate(labels)
            # The first token is predicted by nothing of its own example: in a packed row the
            # previous example's last position would otherwise learn to predict it.
            labels[0] = IGNORE_INDEX
            out.append((ids, labels))
        return out


# Worker processes (--num_proc > 1) get the encoder once, when they start.
_WORKER_ENCODER: Optional[SftEncoder] = None


def _start_worker(encoder: SftEncoder) -> None:
    global _WORKER_ENCODER
    # The parent may have used the tokenizer's own threads before forking; say how to behave, so
    # the tokenizers library does not warn about it in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = encoder


def _encode_in_worker(batch):
    return _WORKER_ENCODER.encode(batch)


def _batches(records, size: int):
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encoded_batches(source, encoder: SftEncoder, num_proc: int = 1):
    """encoder.encode of each batch of `source`, in order, with `num_proc` processes. At most two
    batches per process are in flight, so memory stays bounded however long the input (Pool.imap
    would read the whole input ahead)."""
    if num_proc <= 1:
        for batch in _batches(source, BATCH_SIZE):
            yield encoder.encode(batch)
        return
    with multiprocessing.get_context().Pool(num_proc, initializer=_start_worker, initargs=(encoder,)) as pool:
        pending = deque()
        for batch in _batches(source, BATCH_SIZE):
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()  # a worker's BookcorpusError is raised here, in order
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------------------------
# Examples -> rows
# --------------------------------------------------------------------------------------------

# One row: (input_ids, labels, position_ids), each int32 of sequence_length.
Row = tuple[np.ndarray, np.ndarray, np.ndarray]


class RowPacker:
    """Examples in, rows of exactly `sequence_length` tokens out (each example at most that long).

    packing=True: greedy in order; an example that does not fit in the rest of the current row
    closes it and starts the next. packing=False: one example per row. A closed row is filled with
    padding: `pad_id`, label -100, positions 0, 1, ... (a segment of its own)."""

    def __init__(self, sequence_length: int, pad_id: int, packing: bool = True):
        self.n, self.pad_id, self.packing = sequence_length, pad_id, packing
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.used = 0
        self.padding_tokens = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> list[Row]:
        assert 0 < len(ids) <= self.n, len(ids)
        rows = []
        if self.parts and (not self.packing or self.used + len(ids) > self.n):
            rows.append(self._close())
        self.parts.append((ids, labels))
        self.used += len(ids)
        return rows

    def finish(self) -> list[Row]:
        return [self._close()] if self.parts else []

    def _close(self) -> Row:
        pad = self.n - self.used
        ids = [p[0] for p in self.parts] + [np.full(pad, self.pad_id, dtype=np.int32)]
        labels = [p[1] for p in self.parts] + [np.full(pad, IGNORE_INDEX, dtype=np.int32)]
        positions = [np.arange(len(p[0]), dtype=np.int32) for p in self.parts] + [np.arange(pad, dtype=np.int32)]
        self.padding_tokens += pad
        self.parts, self.used = [], 0
        return np.concatenate(ids), np.concatenate(labels), np.concatenate(positions)


class _RowWriter:
    """Rows to an Arrow stream file with the SFT_FEATURES schema, a record batch every ~16M tokens."""

    def __init__(self, arrow_path: str, sequence_length: int):
        self.n = sequence_length
        self.rows_per_write = max(1, (1 << 24) // sequence_length)
        self.schema = SFT_FEATURES.arrow_schema
        self.sink = pa.OSFile(arrow_path, "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.pending: list[Row] = []
        self.rows = 0

    def write(self, rows: list[Row]) -> None:
        self.pending += rows
        if len(self.pending) >= self.rows_per_write:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        count = len(self.pending)
        offsets = pa.array(np.arange(0, (count + 1) * self.n, self.n, dtype=np.int32))
        columns = [
            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([row[i] for row in self.pending]),
                                                       type=pa.int32()))
            for i in range(3)  # input_ids, labels, position_ids
        ]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.rows += count
        self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()


# --------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SftStats:
    """What prepare_sft produced: counts for the closing line and for tests."""

    examples: int  # example records read
    rows: int  # rows of sequence_length tokens written
    sequence_length: int
    packing: bool
    rendering: str  # how the examples were rendered (DeepSeekFormat / ChatTemplateFormat .description)
    truncated: int  # examples longer than a row, cut to sequence_length tokens and kept
    dropped_long: int  # examples longer than a row, dropped (drop_long)
    dropped_no_response: int  # examples whose cut left no response token, dropped
    response_tokens: int  # target tokens written (labels != -100)
    padding_tokens: int  # padding tokens written

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / max(1, self.rows * self.sequence_length)

    def summary(self, save_path: str | os.PathLike) -> str:
        return (
            f"bookcorpus: wrote {self.rows} rows of {self.sequence_length} tokens to {save_path} "
            f"(sft, rendered with {self.rendering}, packing {'on' if self.packing else 'off'}; "
            f"{self.examples} examples read, {self.truncated} truncated, "
            f"{self.dropped_long + self.dropped_no_response} dropped ({self.dropped_long} longer than "
            f"--sequence_length with --drop_long, {self.dropped_no_response} with no response token "
            f"left after truncation), {self.response_tokens} response tokens, "
            f"padding {100 * self.padding_fraction:.1f}% of the tokens)"
        )


def prepare_sft(
    data_path_or_name: str,
    tokenizer,
    sequence_length: int,
    save_path: str | os.PathLike,
    packing: bool = True,
    drop_long: bool = False,
    num_proc: int = 1,
    tokenizer_name: str = "the tokenizer",
) -> SftStats:
    """Read the examples of `data_path_or_name`, render and label them, pack them into rows of
    `sequence_length` tokens and save those to `save_path` (columns input_ids, labels,
    position_ids). BookcorpusError for bad input; nothing is written then."""
    if sequence_length < 2:
        raise BookcorpusError(
            f"--sequence_length must be at least 2 (got {sequence_length}): a training row needs an "
            f"input token and a next token to predict; pass e.g. --sequence_length 2048"
        )
    _, eos_id = bookcorpus.special_token_ids(tokenizer, tokenizer_name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    renderer = chat_format(tokenizer, tokenizer_name)
    source = SftSource(data_path_or_name)
    total = len(source)
    if total == 0:
        raise bookcorpus._empty_dataset_error(data_path_or_name, "no examples")
    encoder = SftEncoder(tokenizer, renderer)

    save_path = bookcorpus.check_save_path(save_path)
    try:
        save_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BookcorpusError(f"--save_path {save_path}: cannot create its parent directory ({e.strerror}); "
                              f"pass a path in a writable directory") from None

    n = sequence_length
    packer = RowPacker(n, pad_id, packing)
    examples = truncated = dropped_long = dropped_no_response = response_tokens = 0
    # As for pretraining rows: a temporary Arrow file next to the output, copied by save_to_disk.
    with tempfile.TemporaryDirectory(dir=save_path.parent, prefix=".bookcorpus-tmp-") as tmp_dir:
        arrow_path = os.path.join(tmp_dir, "rows.arrow")
        writer = _RowWriter(arrow_path, n)
        try:
            with tqdm(total=total, desc="Tokenizing and packing", unit=" examples") as progress:
                for batch in encoded_batches(source, encoder, num_proc):
                    for ids, labels in batch:
                        examples += 1
                        if len(ids) > n:
                            if drop_long:
                                dropped_long += 1
                                continue
                            ids, labels = ids[:n], labels[:n]
                            if not (labels != IGNORE_INDEX).any():
                                dropped_no_response += 1
                                continue
                            truncated += 1
                        response_tokens += int((labels != IGNORE_INDEX).sum())
                        writer.write(packer.add(ids, labels))
                    progress.update(len(batch))
                writer.write(packer.finish())
        finally:
            writer.close()
        if writer.rows == 0:
            raise BookcorpusError(
                f"no example is left: all {examples} examples are longer than --sequence_length {n} tokens "
                f"({dropped_long} dropped with --drop_long, {dropped_no_response} with no response token "
                f"within the row); pass a larger --sequence_length, or leave out --drop_long"
            )
        bookcorpus.save_rows(arrow_path, save_path)
    return SftStats(
        examples=examples,
        rows=writer.rows,
        sequence_length=n,
        packing=packing,
        rendering=renderer.description,
        truncated=truncated,
        dropped_long=dropped_long,
        dropped_no_response=dropped_no_response,
        response_tokens=response_tokens,
        padding_tokens=packer.padding_tokens,
    )
