"""Tests of bookcorpus.py: exact token-by-token output for every input kind, and bad-input errors.

The expected output is computed here independently of bookcorpus.py: each document is tokenized on
its own, wrapped as [0] + ids + [1] (the demo tokenizer's BOS and EOS ids), the lists are
concatenated, and the stream is cut into rows of N. The saved data set must equal that exactly.

Fixtures demo_corpus_path / demo_tokenizer_dir / demo_tokenizer come from conftest.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bookcorpus
import demo_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS_ID, EOS_ID = 0, 1  # fixed by demo_data.train_demo_tokenizer (and the tiny model configs)
N = 64  # sequence length for most tests: short, so rows cross document and batch boundaries
N_DOCS = 150  # documents used per run: enough for ~100 rows, small enough to stay fast

SUMMARY_RE = re.compile(
    r"^bookcorpus: wrote (\d+) rows of (\d+) tokens to (.+) \((\d+) documents, (\d+) tokens, "
    r"dropped final remainder of (\d+) tokens\)$",
    re.MULTILINE,
)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def isolated_hf_cache(tmp_path_factory):
    """Keep the datasets cache (load_dataset and map results) out of the user's ~/.cache.

    In-process runs read datasets.config.HF_DATASETS_CACHE at call time; subprocess runs read the
    environment variable at import time, so both are set.
    """
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        yield cache


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 7 documents, so the carried remainder crosses many batch boundaries."""
    monkeypatch.setattr(bookcorpus, "BATCH_SIZE", 7)


@pytest.fixture(scope="module")
def texts(demo_corpus_path):
    """The first N_DOCS documents of the demo corpus (multi-line docstrings, some longer than N)."""
    all_texts = demo_data.read_jsonl_texts(demo_corpus_path)
    assert len(all_texts) >= N_DOCS
    return all_texts[:N_DOCS]


def write_jsonl(path, texts, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({column: text}) + "\n")
    return path


def reference_rows(texts, tokenizer, n):
    """(rows, total tokens, remainder) computed the slow, obvious way, one document at a time."""
    stream = []
    for text in texts:
        stream += [BOS_ID] + tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
    n_rows = len(stream) // n
    rows = [stream[i * n : (i + 1) * n] for i in range(n_rows)]
    return rows, len(stream), len(stream) - n_rows * n


def run_main(capsys, *args):
    """bookcorpus.main(args) in this process; returns (exit code, stdout, stderr)."""
    code = bookcorpus.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args):
    """`python bookcorpus.py args` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "bookcorpus.py"), *[str(a) for a in args]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_output(save_path, stdout, texts, tokenizer, n):
    """The saved rows equal the reference token for token, and the closing line tells the truth."""
    expected_rows, total, remainder = reference_rows(texts, tokenizer, n)
    saved = datasets.load_from_disk(str(save_path))
    assert saved.column_names == ["input_ids"]
    assert saved.features["input_ids"] == datasets.List(datasets.Value("int32"))
    rows = list(saved["input_ids"])
    assert all(len(row) == n for row in rows)
    assert len(rows) == len(expected_rows)
    assert rows == expected_rows
    assert 0 <= remainder < n

    match = SUMMARY_RE.search(stdout)
    assert match, stdout
    r, seq, path, docs, tokens, dropped = match.groups()
    assert (int(r), int(seq), path, int(docs), int(tokens), int(dropped)) == (
        len(expected_rows),
        n,
        str(save_path),
        len(texts),
        total,
        remainder,
    )
    return rows


# ------------------------------------------------------------------------------------------------
# The demo tokenizer and corpus (demo_data.py)
# ------------------------------------------------------------------------------------------------


def test_demo_tokenizer_matches_tiny_configs(demo_tokenizer):
    assert len(demo_tokenizer) == 512
    assert (demo_tokenizer.bos_token, demo_tokenizer.bos_token_id) == ("<|begin_of_sentence|>", 0)
    assert (demo_tokenizer.eos_token, demo_tokenizer.eos_token_id) == ("<|end_of_sentence|>", 1)
    assert (demo_tokenizer.pad_token, demo_tokenizer.pad_token_id) == ("<|pad|>", 2)
    text = "Return a new list.\n  Unicode: caf\u00e9 \u2603"
    ids = demo_tokenizer(text)["input_ids"]
    # No post-processor: the tokenizer adds no BOS/EOS of its own, and decoding is lossless.
    assert ids == demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert BOS_ID not in ids and EOS_ID not in ids
    assert demo_tokenizer.decode(ids) == text


def test_demo_data_is_deterministic(tmp_path, demo_corpus_path, demo_tokenizer_dir):
    again = tmp_path / "again.jsonl"
    demo_data.write_stdlib_corpus(again)
    assert again.read_bytes() == demo_corpus_path.read_bytes()
    assert len(again.read_bytes()) <= 1_100_000  # ~1 MB cap (text bytes plus JSON quoting)
    demo_data.train_demo_tokenizer(again, tmp_path / "tok", vocab_size=512)
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (demo_tokenizer_dir / "tokenizer.json").read_bytes()
    # The caps work.
    assert demo_data.write_stdlib_corpus(tmp_path / "five.jsonl", max_documents=5) == 5
    demo_data.write_stdlib_corpus(tmp_path / "small.jsonl", max_bytes=10_000)
    assert sum(len(t.encode()) for t in demo_data.read_jsonl_texts(tmp_path / "small.jsonl")) <= 10_000


# ------------------------------------------------------------------------------------------------
# Correct output for every input kind
# ------------------------------------------------------------------------------------------------


def test_jsonl(tmp_path, capsys, texts, demo_tokenizer, demo_tokenizer_dir, small_batches):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    save = tmp_path / "out"
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", save, "--sequence_length", N,
    )
    assert code == 0, err
    check_output(save, out, texts, demo_tokenizer, N)
    # The chunking pass shows a progress bar, and no temporary files are left next to the output.
    assert "Chunking" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out"]


def test_txt_one_document_per_non_empty_line(tmp_path, capsys, texts, demo_tokenizer, demo_tokenizer_dir):
    # A .txt document is one line: fold each docstring onto one line, and put blank and
    # whitespace-only lines between some of them (those are not documents).
    lines = [" ".join(t.split()) for t in texts]
    with open(tmp_path / "corpus.txt", "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(line + "\n")
            if i % 5 == 0:
                f.write("\n")
            if i % 7 == 0:
                f.write("   \t\n")
    save = tmp_path / "out"
    code, out, err = run_main(
        capsys, "--data_path_or_name", tmp_path / "corpus.txt", "--tokenizer_path_or_name",
        demo_tokenizer_dir, "--save_path", save, "--sequence_length", N,
    )
    assert code == 0, err
    check_output(save, out, lines, demo_tokenizer, N)


def test_parquet_with_text_column_flag(tmp_path, capsys, texts, demo_tokenizer, demo_tokenizer_dir):
    table = pa.table({"id": list(range(len(texts))), "body": texts})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=40)  # several row groups
    save = tmp_path / "out"
    code, out, err = run_main(
        capsys, "--data_path_or_name", tmp_path / "corpus.parquet", "--tokenizer_path_or_name",
        demo_tokenizer_dir, "--save_path", save, "--sequence_length", 100, "--text_column", "body",
    )
    assert code == 0, err
    check_output(save, out, texts, demo_tokenizer, 100)


def test_directory_read_in_name_order(tmp_path, capsys, texts, demo_tokenizer, demo_tokenizer_dir):
    data = tmp_path / "corpus"
    data.mkdir()
    parts = [texts[:50], texts[50:60], texts[60:]]
    # Written in an order that differs from name order; .json and .jsonl are one kind; an empty
    # file adds no documents; files of other types (a README) are ignored.
    write_jsonl(data / "part-2.jsonl", parts[2])
    write_jsonl(data / "part-0.jsonl", parts[0])
    (data / "part-1a-empty.jsonl").write_text("")
    write_jsonl(data / "part-1.json", parts[1])
    (data / "README.md").write_text("not data\n")
    save = tmp_path / "out"
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", save, "--sequence_length", N,
    )
    assert code == 0, err
    check_output(save, out, texts, demo_tokenizer, N)


def test_cli_subprocess(tmp_path, texts, demo_tokenizer, demo_tokenizer_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    save = tmp_path / "out"
    result = run_cli(
        "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", save, "--sequence_length", 128, "--num_proc", 2,
    )
    assert result.returncode == 0, result.stderr
    check_output(save, result.stdout, texts, demo_tokenizer, 128)


def test_num_proc_2_equals_num_proc_1(tmp_path, capsys, texts, demo_tokenizer, demo_tokenizer_dir, small_batches):
    saved = {}
    for num_proc in (1, 2):
        # A separate input file per run: datasets caches map results by the input's fingerprint,
        # so the second run on the same file would read the first run's tokens from the cache.
        data = write_jsonl(tmp_path / f"corpus-{num_proc}.jsonl", texts)
        save = tmp_path / f"out-{num_proc}"
        code, out, err = run_main(
            capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
            "--save_path", save, "--sequence_length", N, "--num_proc", num_proc,
        )
        assert code == 0, err
        saved[num_proc] = check_output(save, out, texts, demo_tokenizer, N)
        if num_proc == 2:
            assert "num_proc=2" in err  # datasets' progress bar shows that two processes ran
    assert saved[1] == saved[2]


def test_library_functions(tmp_path, texts, demo_tokenizer):
    """The importable core: load_documents + tokenize_and_chunk, without the CLI."""
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    documents = bookcorpus.load_documents(str(data))
    assert list(documents["text"]) == texts
    stats = bookcorpus.tokenize_and_chunk(documents, demo_tokenizer, 32, tmp_path / "out")
    rows, total, remainder = reference_rows(texts, demo_tokenizer, 32)
    assert stats == bookcorpus.ChunkStats(
        documents=len(texts), tokens=total, rows=len(rows), sequence_length=32, remainder=remainder
    )
    assert list(datasets.load_from_disk(str(tmp_path / "out"))["input_ids"]) == rows


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bookcorpus.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--data_path_or_name", "--tokenizer_path_or_name", "--save_path", "--sequence_length",
        "--num_proc", "--text_column",
    ):
        assert flag in out


# ------------------------------------------------------------------------------------------------
# Bad input: one `error: ...` line naming the flag and the fix, exit code 2, no traceback
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_without(tmp_path_factory, demo_tokenizer_dir):
    """tokenizer_without("bos") / ("eos"): the demo tokenizer saved without that special token."""
    from transformers import PreTrainedTokenizerFast

    def make(kind):
        special = {"bos_token": demo_data.BOS_TOKEN, "eos_token": demo_data.EOS_TOKEN, "pad_token": demo_data.PAD_TOKEN}
        del special[f"{kind}_token"]
        path = tmp_path_factory.mktemp(f"tokenizer_without_{kind}")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(demo_tokenizer_dir / "tokenizer.json"), **special)
        tok.save_pretrained(str(path))
        return path

    return make


def assert_clean_error(code, err, *fragments):
    """Exit code 2, no traceback, and stderr ends with one `error: ...` line holding every fragment.

    Progress bars of datasets (written with carriage returns) may come before the error line.
    """
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()  # splits at "\r" too, so progress-bar updates are lines of their own
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], err
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, err)


def test_error_missing_path(tmp_path, capsys, demo_tokenizer_dir):
    for missing in (str(tmp_path / "nope"), "./no/such/corpus.jsonl", "corpus_typo.jsonl"):
        code, out, err = run_main(
            capsys, "--data_path_or_name", missing, "--tokenizer_path_or_name", demo_tokenizer_dir,
            "--save_path", tmp_path / "out", "--sequence_length", N,
        )
        assert_clean_error(code, err, f"--data_path_or_name {missing}", "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_error_missing_tokenizer_path(tmp_path, capsys, texts):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", tmp_path / "no_tokenizer",
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "--tokenizer_path_or_name", "no such directory")


@pytest.mark.parametrize("kind", ["bos", "eos"])
def test_error_tokenizer_without_special_token(tmp_path, capsys, texts, tokenizer_without, kind):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    tokenizer_dir = tokenizer_without(kind)
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "--tokenizer_path_or_name", f"has no {kind.upper()} token", f"{kind}_token")
    other = "eos" if kind == "bos" else "bos"
    assert f"no {other.upper()} token" not in err
    assert not (tmp_path / "out").exists()


def test_error_sequence_length_too_small_subprocess(tmp_path, texts, demo_tokenizer_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    result = run_cli(
        "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", 1,
    )
    assert_clean_error(result.returncode, result.stderr, "--sequence_length must be at least 2 (got 1)")
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_error_missing_text_column(tmp_path, capsys, texts, demo_tokenizer_dir):
    data = write_jsonl(tmp_path / "corpus.jsonl", texts, column="body")
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "--text_column", "no column 'text'", "columns present are 'body'")


def test_error_empty_jsonl_subprocess(tmp_path, demo_tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    result = run_cli(
        "--data_path_or_name", tmp_path / "empty.jsonl", "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(result.returncode, result.stderr, "--data_path_or_name", "empty", "no documents")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content", [("blank.txt", "\n  \n\n"), ("whitespace.jsonl", "\n\n")])
def test_error_no_documents(tmp_path, capsys, demo_tokenizer_dir, name, content):
    (tmp_path / name).write_text(content)
    code, out, err = run_main(
        capsys, "--data_path_or_name", tmp_path / name, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "empty", "no documents")


def test_error_fewer_tokens_than_one_row(tmp_path, capsys, demo_tokenizer, demo_tokenizer_dir):
    tiny = ["Hello world.", "Short."]
    data = write_jsonl(tmp_path / "tiny.jsonl", tiny)
    _, total, _ = reference_rows(tiny, demo_tokenizer, N)
    assert total < N
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(
        code, err, f"only {total} tokens", f"fewer than --sequence_length {N}", "no row can be made"
    )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.jsonl"]  # no temporary files left


def test_error_directory_mixing_types(tmp_path, capsys, texts, demo_tokenizer_dir):
    data = tmp_path / "corpus"
    data.mkdir()
    write_jsonl(data / "a.jsonl", texts[:3])
    (data / "b.txt").write_text("a line\n")
    code, out, err = run_main(
        capsys, "--data_path_or_name", data, "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "--data_path_or_name", "mixes file types (.jsonl, .txt)")


def test_error_unsupported_file_type(tmp_path, capsys, demo_tokenizer_dir):
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    code, out, err = run_main(
        capsys, "--data_path_or_name", tmp_path / "corpus.csv", "--tokenizer_path_or_name", demo_tokenizer_dir,
        "--save_path", tmp_path / "out", "--sequence_length", N,
    )
    assert_clean_error(code, err, "--data_path_or_name", "unsupported file type '.csv'")
