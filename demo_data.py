"""Small, self-made data for the demo and the tests: a text corpus and a tokenizer.

Our machines cannot reach the Hugging Face hub, so neither BookCorpus nor a DeepSeek tokenizer can
be downloaded. This module builds stand-ins from what every Python installation carries:

* ``write_stdlib_corpus`` writes a JSON-lines corpus (``{"text": ...}`` per line) made of the
  docstrings of a fixed list of pure-Python standard-library modules and of their public
  functions and classes. It is real English prose mixed with code, a few hundred KB to 1 MB.
* ``train_demo_tokenizer`` trains a byte-level BPE tokenizer on that corpus whose vocabulary matches
  the tiny model configs in ``configs/`` (vocab_size 512, bos_token_id 0, eos_token_id 1) and saves
  it as a Hugging Face tokenizer directory that ``AutoTokenizer.from_pretrained`` loads.
* ``instruction_examples`` / ``write_instruction_jsonl`` derive instruction/response pairs from the
  same docstrings ("What does the function `base64.b64encode` do?" -> the docstring's first
  sentence), the input of ``bookcorpus.py --format sft``.

Run it to get both in one directory::

    python demo_data.py --out_dir ./demo_out/data
    python bookcorpus.py --data_path_or_name ./demo_out/data/corpus.jsonl \\
        --tokenizer_path_or_name ./demo_out/data/tokenizer --save_path ./demo_out/data/chunks_128 \\
        --sequence_length 128
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import os
import sys
import tokenize
from pathlib import Path
from typing import Optional

# The special tokens, in the order that gives them ids 0, 1, 2. The tiny configs say
# bos_token_id 0 and eos_token_id 1, so this order is part of the contract with configs/.
BOS_TOKEN = "<|begin_of_sentence|>"
EOS_TOKEN = "<|end_of_sentence|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Pure-Python standard-library modules (present on every CPython build), sorted by name so that the
# corpus comes out in the same order everywhere. The docstrings of a module depend on the Python
# version, so the corpus is deterministic per Python version, which is all the tests need.
STDLIB_MODULES = tuple(
    sorted(
        [
            "argparse",
            "ast",
            "base64",
            "bisect",
            "calendar",
            "collections",
            "configparser",
            "csv",
            "dataclasses",
            "datetime",
            "decimal",
            "difflib",
            "doctest",
            "email",
            "enum",
            "fractions",
            "functools",
            "gzip",
            "hashlib",
            "heapq",
            "http.client",
            "inspect",
            "itertools",
            "json",
            "logging",
            "pathlib",
            "pprint",
            "random",
            "shutil",
            "statistics",
            "string",
            "tarfile",
            "tempfile",
            "textwrap",
            "tokenize",
            "typing",
            "unittest",
            "urllib.parse",
            "uuid",
            "zipfile",
        ]
    )
)

DEFAULT_MAX_BYTES = 1_000_000


def _module_source_path(module_name: str) -> Optional[str]:
    """Path of the module's .py source, or None when it has none (a C build without the module)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except ImportError:
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return spec.origin


def stdlib_docstrings() -> list[str]:
    """The docstrings of STDLIB_MODULES and of their public top-level functions and classes.

    Order: modules by name; in each, the module docstring, then the functions and classes in the
    order the source file defines them. A docstring already taken is not taken again, so no
    document appears twice.

    The docstrings are read from the source files with ``ast``, not from the imported objects: other
    libraries replace some stdlib functions at import time (importing torch swaps in its own
    ``inspect.getfile``), which would make the corpus depend on what else the process imported.
    """
    docs: list[str] = []
    seen: set[str] = set()
    for module_name in STDLIB_MODULES:
        path = _module_source_path(module_name)
        if path is None:
            continue  # deterministic for a given Python build all the same
        # tokenize.open honours a PEP 263 encoding line, should a module have one.
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        nodes = [tree] + [
            node
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_")
        ]
        for node in nodes:
            # clean=True dedents like inspect.cleandoc.
            doc = ast.get_docstring(node, clean=True)
            doc = doc.strip() if doc else ""
            if not doc or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
    return docs


def write_stdlib_corpus(
    path: str | os.PathLike,
    max_documents: Optional[int] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Write standard-library docstrings as a JSON-lines corpus to ``path``; return the document count.

    Each line is ``{"text": <docstring>}``. Writing stops before the document that would take the
    total UTF-8 size of the texts past ``max_bytes``, or after ``max_documents`` documents, whichever
    comes first. Same Python version, same arguments: same file, byte for byte.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be at least 1 (got {max_documents})")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1 (got {max_bytes})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    total_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in stdlib_docstrings():
            if max_documents is not None and count >= max_documents:
                break
            size = len(doc.encode("utf-8"))
            if total_bytes + size > max_bytes:
                break
            # ensure_ascii=False keeps the file readable; sort_keys is moot with one key.
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            count += 1
            total_bytes += size
    return count


def read_jsonl_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """The ``text_column`` value of every line of a JSON-lines file, in order (blank lines skipped)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)[text_column])
    return texts


def train_demo_tokenizer(
    corpus_path: str | os.PathLike,
    save_dir: str | os.PathLike,
    vocab_size: int = 512,
):
    """Train a byte-level BPE tokenizer on a JSON-lines corpus and save it as a HF tokenizer directory.

    The vocabulary has exactly ``vocab_size`` entries: the special tokens ``<|begin_of_sentence|>``
    (id 0), ``<|end_of_sentence|>`` (id 1) and ``<|pad|>`` (id 2), the 256 byte symbols, and BPE
    merges for the rest. The tokenizer adds no special tokens when encoding (it has no
    post-processor), so whoever builds training sequences (bookcorpus.py) decides where BOS and EOS
    go. Returns the ``PreTrainedTokenizerFast`` that was saved.

    Raises ValueError when the corpus is too small to learn enough merges for ``vocab_size``.
    """
    # Imported here so that writing a corpus needs neither library.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_vocab = len(SPECIAL_TOKENS) + len(byte_alphabet)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be at least {min_vocab} (3 special tokens + 256 byte symbols), got {vocab_size}"
        )

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word is encoded as written, and
    # decode(encode(text)) == text exactly. use_regex=True splits words the way GPT-2 does.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # No tokenizer.post_processor: encoding must not add BOS/EOS by itself.

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Special tokens are added first, so they get ids 0, 1, 2 in this order.
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes are in the vocabulary even if the corpus lacks some, so any text encodes.
        initial_alphabet=byte_alphabet,
        min_frequency=2,
        show_progress=False,
    )
    # The BPE trainer breaks ties between equally frequent pairs by the pair itself, so the same
    # corpus gives the same merges on every run, whatever the number of threads.
    tokenizer.train_from_iterator(read_jsonl_texts(corpus_path), trainer=trainer)

    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus {corpus_path} is too small to train a vocabulary of {vocab_size} "
            f"(got {tokenizer.get_vocab_size()}); write a larger corpus"
        )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Keep decode(encode(text)) == text: no "clean-up" of spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(str(save_dir))
    return hf_tokenizer


# --------------------------------------------------------------------------------------------
# A small instruction set (for `bookcorpus.py --format sft` in the demo and the tests)
# --------------------------------------------------------------------------------------------

# The "input" of the summarizing examples (the docstring) is cut to this many characters, so
# that most examples fit the demo's rows of 128 tokens (the demo tokenizer makes about one token
# of three characters).
INSTRUCTION_INPUT_CHARS = 200


@functools.lru_cache(maxsize=1)
def stdlib_definitions() -> tuple[tuple[str, str, str], ...]:
    """(qualified name, "function" or "class", docstring) of the public top-level functions and
    classes of STDLIB_MODULES that have a docstring, in the order of ``stdlib_docstrings``
    (modules by name, definitions in source order). Read with ``ast`` for the same reason; parsed
    once per process (about a second), as the tests ask for the examples many times."""
    definitions = []
    for module_name in STDLIB_MODULES:
        path = _module_source_path(module_name)
        if path is None:
            continue
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                definitions.append((f"{module_name}.{node.name}", kind, doc.strip()))
    return tuple(definitions)


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, ending with a period. A
    title paragraph (a few words, no period, e.g. "Covariance" above its text) is skipped."""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    paragraph = paragraphs[0]
    if len(paragraphs) > 1 and len(paragraph.split()) <= 4 and not paragraph.endswith((".", "!", "?", ":")):
        paragraph = paragraphs[1]
    end = paragraph.find(". ")
    sentence = paragraph if end < 0 else paragraph[: end + 1]
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def instruction_examples(n: Optional[int] = None) -> list[dict]:
    """Up to ``n`` (default: all) instruction/response pairs about the standard library, in a fixed order.

    Each comes from one documented function or class (``stdlib_definitions``), and its response is
    the first sentence of the docstring (``first_sentence``). Every third is a request to summarize
    the docstring, given (its start) as ``input`` (``{"instruction", "input", "output"}``); the
    others ask what the function does or what the class is for (``{"instruction", "output"}``), so
    both record shapes ``bookcorpus.py --format sft`` reads appear. Same Python version, same list.
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    examples = []
    for i, (name, kind, doc) in enumerate(stdlib_definitions()):
        if n is not None and len(examples) >= n:
            break
        answer = first_sentence(doc)
        if i % 3 == 2:
            examples.append({
                "instruction": "Summarize this docstring in one sentence.",
                "input": doc[:INSTRUCTION_INPUT_CHARS],
                "output": answer,
            })
        elif kind == "class":
            examples.append({"instruction": f"What is the class `{name}` for?", "output": answer})
        else:
            examples.append({"instruction": f"What does the function `{name}` do?", "output": answer})
    return examples


def write_instruction_jsonl(path: str | os.PathLike, n: Optional[int] = None) -> int:
    """Write ``instruction_examples(n)`` to ``path`` as JSON lines (one object per line, the input
    ``bookcorpus.py --format sft`` reads); return the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = instruction_examples(n)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return len(examples)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the demo corpus (standard-library docstrings, JSON lines) and train the "
        "demo tokenizer (byte-level BPE, vocab 512, BOS id 0, EOS id 1) on it."
    )
    parser.add_argument(
        "--out_dir",
        required=True,
        help="directory to write into: <out_dir>/corpus.jsonl and <out_dir>/tokenizer/",
    )
    parser.add_argument(
        "--max_bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"cap on the corpus text size in UTF-8 bytes (default {DEFAULT_MAX_BYTES})",
    )
    parser.add_argument(
        "--max_documents", type=int, default=None, help="cap on the number of documents (default: no cap)"
    )
    parser.add_argument(
        "--vocab_size", type=int, default=512, help="tokenizer vocabulary size (default 512, as the tiny configs)"
    )
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    corpus_path = out_dir / "corpus.jsonl"
    tokenizer_dir = out_dir / "tokenizer"
    try:
        n_docs = write_stdlib_corpus(corpus_path, max_documents=args.max_documents, max_bytes=args.max_bytes)
        train_demo_tokenizer(corpus_path, tokenizer_dir, vocab_size=args.vocab_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo_data: wrote {n_docs} documents to {corpus_path} and a {args.vocab_size}-token tokenizer to {tokenizer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
