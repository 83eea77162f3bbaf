"""Tests of `bookcorpus.py --format sft` (sft_data.py): rendering, labels, packing, counts, bad input.

The expected tokens are computed here a different way from sft_data.py: the whole rendered text of
an example is tokenized at once, with character offsets, and a token is a target when it starts
inside a response's characters (sft_data.py tokenizes pieces cut at the response boundaries and
labels whole pieces). For byte-level BPE both must agree token for token.

The tokenizer of these tests carries DeepSeek's real special tokens (BOS `<｜begin▁of▁sentence｜>`,
EOS `<｜end▁of▁sentence｜>`, with full-width bars as in DeepSeek's tokenizer_config.json), so the
rendered text is exactly the one DeepSeek's chat models see.
"""

import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bookcorpus
import demo_data
import sft_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
IGNORE = -100

# The chat template of DeepSeek-V2(-Lite)-Chat (tokenizer_config.json): the DeepSeek format.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# A ChatML-style template (another family's layout: role headers, an end-of-turn marker and a newline).
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same without a generation prompt: the response headers must be found by the content.
CHATML_NO_GENERATION_PROMPT = CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0]
# Marks the last message: rendering a prefix is then not the start of rendering the whole.
UNSTABLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if loop.last %}{{ ' [end]' }}{% endif %}{{ '\n' }}{% endfor %}"
)
REFUSING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{{ message['content'] }}{% endfor %}"
)


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


def train_tokenizer(texts, save_dir, special_tokens, pad_token):
    """A byte-level BPE (vocab 512) with `special_tokens` first, saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special_tokens[0], eos_token=special_tokens[1],
                                 pad_token=pad_token, clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(save_dir))
    return save_dir


@pytest.fixture(scope="module")
def corpus_texts(demo_corpus_path):
    return demo_data.read_jsonl_texts(demo_corpus_path)[:400]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus_texts):
    """DeepSeek's BOS / EOS (ids 0, 1) and a pad token (id 2); no chat_template: the DeepSeek format."""
    return train_tokenizer(corpus_texts, tmp_path_factory.mktemp("ds_tokenizer"), (BOS, EOS, PAD), PAD)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return bookcorpus.load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def tokenizer_without_pad_dir(tmp_path_factory, corpus_texts):
    return train_tokenizer(corpus_texts, tmp_path_factory.mktemp("ds_tokenizer_no_pad"), (BOS, EOS), None)


@pytest.fixture(scope="module")
def templated(tmp_path_factory, tokenizer_dir):
    """templated(template): the test tokenizer saved again with that chat_template."""
    from transformers import AutoTokenizer

    made = {}

    def make(template):
        if template not in made:
            path = tmp_path_factory.mktemp("templated")
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            tok.chat_template = template
            tok.save_pretrained(str(path))
            made[template] = path
        return made[template]

    return make


# ------------------------------------------------------------------------------------------------
# The reference: whole-text tokenization, targets by character offsets
# ------------------------------------------------------------------------------------------------


def deepseek_text(messages):
    """The DeepSeek rendering of `messages` and the character spans of its responses (each the
    space after "Assistant:", the content and the EOS)."""
    text, spans = BOS, []
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "User: " + m["content"] + "\n\n"
        else:
            text += "Assistant:"
            start = len(text)
            text += " " + m["content"] + EOS
            spans.append((start, len(text)))
    return text, spans


def reference_example(tokenizer, text, spans):
    """(input_ids, labels) of the whole `text` tokenized at once; a token is a target when its first
    character lies in a span; the first token never is."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE
              for t, (start, _) in zip(ids, encoding["offset_mapping"])]
    labels[0] = IGNORE
    return ids, labels


def record_messages(record):
    """The messages of a record, as the issue defines them (the reference for conversation_of)."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[: last + 1]
    prompt = record["instruction"] + (("\n\n" + record["input"]) if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def split_rows(saved):
    """The segments of every row (position_ids restart at 0): a list of (row, start, end)."""
    segments = []
    for r, positions in enumerate(saved["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        segments += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return segments


def check_row_format(saved, n, pad_id):
    """The SFT row format the training side reads, for every row: int32 columns of n tokens,
    positions 0, 1, ... per segment, labels equal to the ids where not -100 (not shifted), the first
    token of every segment not a target, and a padding segment (pad ids only, no target) only last."""
    assert saved.features == sft_data.SFT_FEATURES
    assert saved.column_names == ["input_ids", "labels", "position_ids"]
    for ids, labels, positions in zip(saved["input_ids"], saved["labels"], saved["position_ids"]):
        assert len(ids) == len(labels) == len(positions) == n
        assert positions[0] == 0
        for i in range(1, n):
            assert positions[i] in (0, positions[i - 1] + 1)
        for i in range(n):
            assert labels[i] in (IGNORE, ids[i])
            if positions[i] == 0:
                assert labels[i] == IGNORE
        starts = [i for i in range(n) if positions[i] == 0] + [n]
        for a, b in zip(starts[:-2], starts[1:-1]):  # every segment but the last is an example
            assert set(ids[a:b]) != {pad_id} and any(t != IGNORE for t in labels[a:b])


def first_segment_length(row):
    """Tokens before the second segment (the padding, or the next example) of a row."""
    positions = row["position_ids"]
    return positions.index(0, 1) if 0 in positions[1:] else len(positions)


def run_main(capsys, *args):
    code = bookcorpus.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def prepare(capsys, tmp_path, data, tokenizer_dir, n, *extra):
    save = tmp_path / "out"
    code, out, err = run_main(capsys, "--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name",
                              tokenizer_dir, "--save_path", save, "--sequence_length", n, *extra)
    assert code == 0, err
    return datasets.load_from_disk(str(save)), out, err


def assert_clean_error(code, err, *fragments):
    """Exit 2, no traceback, stderr ends with exactly one `error: ...` line holding every fragment."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], err
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What does `heapq.heappush` do?"},
        {"role": "assistant", "content": "Push item onto heap, maintaining the heap invariant."},
        {"role": "user", "content": "And `heapq.heappop`?"},
        {"role": "assistant", "content": "Pop the smallest item off the heap."},
        {"role": "user", "content": "Thanks."},  # after the last response: left out
    ]
}
SINGLE = {"instruction": "Summarize this docstring in one sentence.", "input": "Return the sum of a list.",
          "output": "It adds the numbers up."}
GREETING = {"messages": [{"role": "assistant", "content": "Hello, ask me about Python."},
                         {"role": "user", "content": "What is `json`?"},
                         {"role": "assistant", "content": "A JSON encoder and decoder."}]}


# ------------------------------------------------------------------------------------------------
# Rendering and labels
# ------------------------------------------------------------------------------------------------


def test_deepseek_format_exact_tokens_and_spans(tmp_path, capsys, tokenizer, tokenizer_dir):
    records = [SINGLE, MULTI_TURN, GREETING]
    n = 256
    saved, out, _ = prepare(capsys, tmp_path, write_jsonl(tmp_path / "d.jsonl", records), tokenizer_dir, n,
                            "--packing", "off")
    assert "rendered with the DeepSeek format (the tokenizer has no chat_template)" in out
    check_row_format(saved, n, tokenizer.pad_token_id)
    assert len(saved) == len(records)

    # The rendered text, decoded back, is exactly DeepSeek's format.
    row = saved[0]
    length = first_segment_length(row)
    assert tokenizer.decode(row["input_ids"][:length]) == (
        f"{BOS}User: Summarize this docstring in one sentence.\n\nReturn the sum of a list.\n\n"
        f"Assistant: It adds the numbers up.{EOS}"
    )
    targets = [t for t in row["labels"] if t != IGNORE]
    assert tokenizer.decode(targets) == f" It adds the numbers up.{EOS}"

    # Multi-turn: every response (and its EOS) is a target, nothing else; the system text opens it
    # and the trailing user turn is gone.
    row = saved[1]
    length = first_segment_length(row)
    text = tokenizer.decode(row["input_ids"][:length])
    assert text.startswith(f"{BOS}You answer questions about Python.\n\nUser: What does")
    assert text.endswith(f"Assistant: Pop the smallest item off the heap.{EOS}")
    assert "Thanks." not in text
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == [f" Push item onto heap, maintaining the heap invariant.{EOS}",
                    f" Pop the smallest item off the heap.{EOS}"]

    # Token for token as the whole text tokenized at once, and the padding after it.
    for row, record in zip(saved, records):
        ids, labels = reference_example(tokenizer, *deepseek_text(record_messages(record)))
        assert row["input_ids"][: len(ids)] == ids
        assert row["labels"][: len(ids)] == labels
        assert len(ids) < n and row["position_ids"] == list(range(len(ids))) + list(range(n - len(ids)))
        assert set(row["input_ids"][len(ids):]) == {tokenizer.pad_token_id}
        assert set(row["labels"][len(ids):]) == {IGNORE}
    # A conversation opening with the assistant: "BOS Assistant:" is its prompt.
    first_target = next(i for i, t in enumerate(saved[2]["labels"]) if t != IGNORE)
    assert tokenizer.decode(saved[2]["input_ids"][:first_target]) == f"{BOS}Assistant:"


def test_deepseek_chat_template_gives_the_same_rows(tmp_path, capsys, tokenizer_dir, templated):
    """DeepSeek's own chat_template and the built-in format render the same rows, bit for bit."""
    records = [SINGLE, MULTI_TURN, GREETING] + demo_data.instruction_examples(30)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    built_in, _, _ = prepare(capsys, tmp_path / "a", data, tokenizer_dir, 96)
    from_template, out, _ = prepare(capsys, tmp_path / "b", data, templated(DEEPSEEK_TEMPLATE), 96)
    assert "rendered with the tokenizer's chat_template" in out
    assert from_template.to_dict() == built_in.to_dict()


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, CHATML_NO_GENERATION_PROMPT], ids=["generation_prompt", "none"])
def test_chat_template_response_spans(tmp_path, capsys, tokenizer_dir, templated, template):
    from transformers import AutoTokenizer

    path = templated(template)
    tok = AutoTokenizer.from_pretrained(str(path))
    saved, _, _ = prepare(capsys, tmp_path, write_jsonl(tmp_path / "d.jsonl", [MULTI_TURN, SINGLE]), path, 256,
                          "--packing", "off")
    check_row_format(saved, 256, tok.pad_token_id)

    def runs(row):
        out, current = [], []
        for token, label in zip(row["input_ids"], row["labels"]):
            if label != IGNORE:
                current.append(token)
            elif current:
                out.append(tok.decode(current))
                current = []
        return out + ([tok.decode(current)] if current else [])

    # The targets are each response, its end-of-turn marker and the newline the template puts after
    # it; the headers ("<|im_start|>assistant\n") are prompt, also when the template has no
    # generation prompt.
    assert runs(saved[0]) == ["Push item onto heap, maintaining the heap invariant.<|im_end|>\n",
                              "Pop the smallest item off the heap.<|im_end|>\n"]
    assert runs(saved[1]) == ["It adds the numbers up.<|im_end|>\n"]
    # The whole row is the template's rendering of the conversation up to its last response.
    messages = record_messages(MULTI_TURN)
    length = first_segment_length(saved[0])
    assert tok.decode(saved[0]["input_ids"][:length]) == tok.apply_chat_template(messages, tokenize=False)
    if template == CHATML_TEMPLATE:
        # The first prompt is token for token what a chat front end feeds the model.
        prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert saved[0]["input_ids"][: len(prompt_ids)] == prompt_ids
        assert saved[0]["labels"][len(prompt_ids)] != IGNORE and saved[0]["labels"][len(prompt_ids) - 1] == IGNORE


def test_chat_template_errors(tmp_path, capsys, templated):
    data = write_jsonl(tmp_path / "d.jsonl", [SINGLE, MULTI_TURN])
    code, _, err = run_main(capsys, "--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name",
                            templated(UNSTABLE_TEMPLATE), "--save_path", tmp_path / "o", "--sequence_length", 64)
    assert_clean_error(code, err, f"{data}, line 1, field 'output'", "growing prefixes",
                       "renders each turn the same whatever follows it")
    code, _, err = run_main(capsys, "--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name",
                            templated(REFUSING_TEMPLATE), "--save_path", tmp_path / "o", "--sequence_length", 64)
    assert_clean_error(code, err, f"{data}, line 2", "chat_template failed", "System role not supported")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Packing, padding, truncation
# ------------------------------------------------------------------------------------------------


def reference_examples(tokenizer, records):
    return [reference_example(tokenizer, *deepseek_text(record_messages(r))) for r in records]


def test_packing_greedy_in_order_never_splits(tmp_path, capsys, tokenizer, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(sft_data, "BATCH_SIZE", 7)  # many batches: packing carries across them
    n = 128
    # The examples that fit in a row (truncation has its own test).
    records = [r for r in demo_data.instruction_examples(80)
               if len(reference_examples(tokenizer, [r])[0][0]) <= n]
    assert len(records) > 60
    expected = reference_examples(tokenizer, records)
    saved, out, err = prepare(capsys, tmp_path, write_jsonl(tmp_path / "d.jsonl", records), tokenizer_dir, n)
    assert "Tokenizing and packing" in err  # the progress bar
    check_row_format(saved, n, tokenizer.pad_token_id)

    # Split at every position 0: the examples in order, each whole in one row, then padding.
    segments = split_rows(saved)
    got, used = [], {}
    for r, a, b in segments:
        ids, labels = saved[r]["input_ids"][a:b], saved[r]["labels"][a:b]
        if len(got) < len(expected) and ids == expected[len(got)][0]:
            assert labels == expected[len(got)][1]
            got.append(r)
            used[r] = b
        else:  # padding: the rest of the row
            assert b == n and set(ids) == {tokenizer.pad_token_id} and set(labels) == {IGNORE}
    assert len(got) == len(expected)
    # Greedy: a row is closed only when the next example does not fit in what is left of it.
    for i in range(1, len(got)):
        if got[i] != got[i - 1]:
            assert used[got[i - 1]] + len(expected[i][0]) > n
    assert len(saved) == got[-1] + 1

    stats = sft_data.prepare_sft(str(tmp_path / "d.jsonl"), tokenizer, n, tmp_path / "again")
    assert stats.rows == len(saved) and stats.examples == len(records)
    assert stats.response_tokens == sum(sum(1 for t in labels if t != IGNORE) for _, labels in expected)
    assert stats.padding_tokens == len(saved) * n - sum(len(ids) for ids, _ in expected)
    assert (stats.truncated, stats.dropped_long, stats.dropped_no_response) == (0, 0, 0)
    assert stats.summary(tmp_path / "out") in out
    assert datasets.load_from_disk(str(tmp_path / "again")).to_dict() == saved.to_dict()


def test_packing_off_one_example_per_row(tmp_path, capsys, tokenizer_without_pad_dir):
    """One example per row, padded; a tokenizer without a pad token pads with EOS."""
    tok = bookcorpus.load_tokenizer(str(tokenizer_without_pad_dir))
    assert tok.pad_token_id is None
    records = demo_data.instruction_examples(12)
    n = 256
    expected = reference_examples(tok, records)
    saved, out, _ = prepare(capsys, tmp_path, write_jsonl(tmp_path / "d.jsonl", records), tokenizer_without_pad_dir,
                            n, "--packing", "off")
    assert "packing off" in out
    check_row_format(saved, n, tok.eos_token_id)
    assert len(saved) == len(records)
    for row, (ids, labels) in zip(saved, expected):
        k = len(ids)
        assert k < n
        assert row["input_ids"] == ids + [tok.eos_token_id] * (n - k)
        assert row["labels"] == labels + [IGNORE] * (n - k)
        assert row["position_ids"] == list(range(k)) + list(range(n - k))


def test_truncation_and_drop_counts(tmp_path, capsys, tokenizer, tokenizer_dir):
    long_prompt = {"instruction": "Repeat after me. " * 40, "output": "No."}  # prompt alone > n
    records = demo_data.instruction_examples(40) + [long_prompt]
    n = 48
    expected = reference_examples(tokenizer, records)
    long = [i for i, (ids, _) in enumerate(expected) if len(ids) > n]
    no_response = [i for i in long if all(t == IGNORE for t in expected[i][1][:n])]
    assert len(long) > len(no_response) > 0 and len(expected) - len(long) > 0  # the data has every case
    data = write_jsonl(tmp_path / "d.jsonl", records)

    stats = sft_data.prepare_sft(str(data), tokenizer, n, tmp_path / "cut", packing=False)
    assert (stats.examples, stats.truncated, stats.dropped_long, stats.dropped_no_response) == (
        len(records), len(long) - len(no_response), 0, len(no_response))
    kept = [i for i in range(len(records)) if i not in no_response]
    saved = datasets.load_from_disk(str(tmp_path / "cut"))
    assert len(saved) == stats.rows == len(kept)
    for row, i in zip(saved, kept):  # a cut example is its first n tokens
        ids, labels = expected[i]
        k = min(len(ids), n)
        assert row["input_ids"][:k] == ids[:k] and row["labels"][:k] == labels[:k]
    assert stats.response_tokens == sum(sum(1 for t in expected[i][1][:n] if t != IGNORE) for i in kept)

    saved, out, _ = prepare(capsys, tmp_path, data, tokenizer_dir, n, "--drop_long", "--packing", "off")
    short = [i for i in range(len(records)) if i not in long]
    assert [row["input_ids"][: len(expected[i][0])] for row, i in zip(saved, short)] == [expected[i][0] for i in short]
    assert len(saved) == len(short)
    assert (f"{len(records)} examples read, 0 truncated, {len(long)} dropped ({len(long)} longer than "
            f"--sequence_length with --drop_long, 0 with no response token left after truncation)") in out


def test_num_proc_2_and_directory_input(tmp_path, capsys, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(sft_data, "BATCH_SIZE", 5)
    records = demo_data.instruction_examples(40) + [MULTI_TURN]
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records[:25])
    write_jsonl(folder / "b.jsonl", records[25:])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single_file = write_jsonl(tmp_path / "all.jsonl", records)
    one, _, _ = prepare(capsys, tmp_path / "one", single_file, tokenizer_dir, 96)
    two, _, _ = prepare(capsys, tmp_path / "two", folder, tokenizer_dir, 96, "--num_proc", 2)
    assert two.to_dict() == one.to_dict()
    # A bad row found in a worker process is reported as in one process, by its file and line.
    write_jsonl(folder / "b.jsonl", records[25:30] + [{"instruction": "x"}])
    code, _, err = run_main(capsys, "--format", "sft", "--data_path_or_name", folder, "--tokenizer_path_or_name",
                            tokenizer_dir, "--save_path", tmp_path / "three", "--sequence_length", 96, "--num_proc", 2)
    assert_clean_error(code, err, f"{folder / 'b.jsonl'}, line 6, field 'output': missing")
    assert not (tmp_path / "three").exists()


def test_help_lists_the_sft_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bookcorpus.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--format {text,sft}", "--packing {on,off}", "--drop_long", "--document_masking on"):
        assert flag in out


def test_json_array_and_parquet_input(tmp_path, capsys, tokenizer_dir):
    records = demo_data.instruction_examples(10)
    (tmp_path / "ref").mkdir()
    reference, _, _ = prepare(capsys, tmp_path / "ref", write_jsonl(tmp_path / "d.jsonl", records), tokenizer_dir, 96)
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    (tmp_path / "json").mkdir()
    from_array, _, _ = prepare(capsys, tmp_path / "json", tmp_path / "d.json", tokenizer_dir, 96)
    assert from_array.to_dict() == reference.to_dict()
    # Parquet has every column in every row (null where an example has no "input").
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp_path / "d.parquet")
    (tmp_path / "pq").mkdir()
    from_parquet, _, _ = prepare(capsys, tmp_path / "pq", tmp_path / "d.parquet", tokenizer_dir, 96)
    assert from_parquet.to_dict() == reference.to_dict()


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the row and the field
# ------------------------------------------------------------------------------------------------

GOOD = {"instruction": "Say hi.", "output": "Hi."}
BAD_ROWS = [
    ({"output": "x"}, ["field 'instruction': missing"]),
    ({"instruction": "x"}, ["field 'output': missing"]),
    ({"instruction": "x", "output": "  \n"}, ["field 'output': empty"]),
    ({"instruction": "x", "output": 3}, ["field 'output': holds a number, not text"]),
    ({"instruction": "", "output": "y"}, ["field 'instruction': empty"]),
    ({"text": "pretraining text"}, ["no field 'messages', 'instruction' or 'output'", "'text'"]),
    ({"messages": "hello"}, ["field 'messages': holds text, not a list of turns"]),
    ({"messages": []}, ["field 'messages': holds an empty list"]),
    ({"messages": [{"role": "human", "content": "x"}]}, ["field 'messages[0].role': 'human' is not", "'user'"]),
    ({"messages": [{"from": "human", "value": "x"}]}, ["field 'messages[0].role': missing", "ShareGPT"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
     ["field 'messages': no assistant turn (roles: user, user)"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     ["field 'messages[1].content': an empty assistant turn"]),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     ["field 'messages[0].content': holds a list, not text"]),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, ["field 'messages[0].content': missing"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "output": "z"},
     ["field 'output': the example has both 'messages' and 'output'"]),
    (["a", "list"], ["the example is a list, not an object"]),
    ('{"instruction": "x", "output": ', ["not valid JSON"]),
]


@pytest.mark.parametrize("bad, fragments", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_bad_row_named_by_file_line_and_field(tmp_path, capsys, tokenizer_dir, bad, fragments):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, bad, GOOD])  # line 2 is blank
    code, _, err = run_main(capsys, "--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name",
                            tokenizer_dir, "--save_path", tmp_path / "out", "--sequence_length", 32)
    assert_clean_error(code, err, f"{data}, line 4", *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_rows_of_arrays_parquet_and_inputs(tmp_path, capsys, tokenizer_dir):
    def error(data, *extra):
        code, _, err = run_main(capsys, "--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name",
                                tokenizer_dir, "--save_path", tmp_path / "out", "--sequence_length", 32, *extra)
        return code, err

    (tmp_path / "a.json").write_text(json.dumps([GOOD, {"instruction": "x"}]), encoding="utf-8")
    assert_clean_error(*error(tmp_path / "a.json"), f"{tmp_path / 'a.json'}, row 1, field 'output': missing")
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, {"instruction": "x", "output": None}]), tmp_path / "a.parquet")
    assert_clean_error(*error(tmp_path / "a.parquet"), f"{tmp_path / 'a.parquet'}, row 2, field 'output': missing")
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    assert_clean_error(*error(tmp_path / "a.txt"), "--format sft reads examples from .jsonl, .json or .parquet")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    assert_clean_error(*error(tmp_path / "empty.jsonl"), "the data set is empty")
    # Every example longer than a row and --drop_long: nothing is left.
    data = write_jsonl(tmp_path / "d.jsonl", [SINGLE, MULTI_TURN])
    assert_clean_error(*error(data, "--drop_long"), "no example is left", "2 dropped with --drop_long")
    # The SFT flags belong to --format sft.
    code, _, err = run_main(capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", tokenizer_dir,
                            "--save_path", tmp_path / "out", "--sequence_length", 32, "--packing", "off")
    assert_clean_error(code, err, "--packing applies to --format sft only")
    assert not (tmp_path / "out").exists()


def test_cli_subprocess(tmp_path, tokenizer_dir):
    """The real command line (bookcorpus.py run as a script imports sft_data) writes the rows."""
    data = write_jsonl(tmp_path / "d.jsonl", [SINGLE, MULTI_TURN])
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}

    def cli(save):
        args = ["--format", "sft", "--data_path_or_name", data, "--tokenizer_path_or_name", tokenizer_dir,
                "--save_path", save, "--sequence_length", 256]
        return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bookcorpus.py"), *map(str, args)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)

    run = cli(tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert "bookcorpus: wrote 1 rows of 256 tokens" in run.stdout
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 1


# ------------------------------------------------------------------------------------------------
# The demo instruction set
# ------------------------------------------------------------------------------------------------


def test_demo_instruction_set(tmp_path):
    examples = demo_data.instruction_examples()
    definitions = demo_data.stdlib_definitions()
    assert len(examples) == len(definitions) >= 300
    assert demo_data.instruction_examples(25) == examples[:25]
    for i, (example, (name, kind, doc)) in enumerate(zip(examples, definitions)):
        answer = example["output"]
        assert answer == demo_data.first_sentence(doc) and answer.endswith((".", "!", "?")) and "\n" not in answer
        assert answer.rstrip(".") in " ".join(doc.split())  # a sentence of the docstring
        if i % 3 == 2:
            assert set(example) == {"instruction", "input", "output"}
            assert doc.startswith(example["input"]) and len(example["input"]) <= demo_data.INSTRUCTION_INPUT_CHARS
        else:
            assert set(example) == {"instruction", "output"} and f"`{name}`" in example["instruction"]
            assert ("class" if kind == "class" else "function") in example["instruction"]
    assert demo_data.write_instruction_jsonl(tmp_path / "i.jsonl", 20) == 20
    lines = (tmp_path / "i.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == examples[:20]
    assert demo_data.first_sentence("Return x. Then more.\n\nDetails.") == "Return x."
    assert demo_data.first_sentence("No final period\nhere") == "No final period here."
    assert demo_data.first_sentence("Covariance\n\nReturn the covariance. More.") == "Return the covariance."
