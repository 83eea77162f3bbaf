"""Shared pytest fixtures: a small demo corpus and tokenizer built once per test session.

Nothing can be downloaded on our machines, so tests that need text or a tokenizer use the ones that
demo_data.py builds from the Python standard library's docstrings (a few hundred KB, about two
seconds to build).
"""

import os
import sys

import pytest

# Make the repository root importable (bookcorpus.py, demo_data.py, modeling/, ...) also when pytest
# is started as `pytest` rather than `python -m pytest` (only the latter puts the cwd on sys.path).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A session-wide directory holding corpus.jsonl and tokenizer/ (see the two fixtures below)."""
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="session")
def demo_corpus_path(demo_data_dir):
    """Path of a JSON-lines corpus ({"text": ...} per line) of standard-library docstrings."""
    import demo_data

    path = demo_data_dir / "corpus.jsonl"
    demo_data.write_stdlib_corpus(path)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer_dir(demo_data_dir, demo_corpus_path):
    """Directory of the demo tokenizer: byte-level BPE, vocab 512, BOS id 0, EOS id 1, PAD id 2."""
    import demo_data

    path = demo_data_dir / "tokenizer"
    demo_data.train_demo_tokenizer(demo_corpus_path, path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir):
    """The demo tokenizer, loaded with AutoTokenizer as a user would."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))
