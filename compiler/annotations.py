"""Op annotations: the einsum-like grammar that tells the planner how an op may be split.

An annotation reads ``inputs -> outputs``; each side is a comma-separated list of argument
specs, one per argument of the op (or per returned value), in order::

    n l h^, e^ h^ -> (n l) k^, (n l) k^     # the MoE router
    m k+, k+ n -> m n                       # a matmul
    n d, ?, 1 -> n d                        # a tensor, a non-tensor arg, a 0-dim tensor

A tensor spec is a space-separated list of dims, one per tensor dim. A dim is a name
(``[A-Za-z][A-Za-z0-9_]*``) or a group ``(n l)``: one tensor dim that is the flattening of the
named dims, so its size is their product. A name may carry one suffix:

* none: the dim may be split across devices;
* ``^``: the dim may not be split;
* ``+``: the dim may be split, but splitting it leaves partial sums that must be reduced. Only a
  contracted dim (one that appears in inputs and in no output) can be ``+``.

``?`` stands for a non-tensor argument (an int, a bool, ...) and ``1`` for a 0-dim tensor; each
stands alone as a whole spec. A name carries the same suffix everywhere it appears. An output
name that is in no input is a new dim the op creates (k^ for top-k) and must be ``^``, because
nothing upstream could have split it.

The registry maps a qualified custom-op name (``deepseek::moe_route``) to its parsed annotation;
the tracer reads it and calls :func:`check_shapes` to confirm the annotation agrees with the
shapes it traced.
"""

from __future__ import annotations

import math
import operator
import string
from dataclasses import dataclass
from typing import Callable, Literal, NoReturn, Optional, Sequence, TypeVar

__all__ = [
    "Annotation",
    "AnnotationError",
    "AnnotationShapeError",
    "Dim",
    "TensorSpec",
    "annotate",
    "check_shapes",
    "get_op_annotation",
    "parse_annotation",
    "register_op_annotation",
    "registered_ops",
]

SUFFIX_NO_SPLIT = "^"
SUFFIX_REDUCE = "+"
_SUFFIXES = SUFFIX_NO_SPLIT + SUFFIX_REDUCE


# --------------------------------------------------------------------------- errors


class AnnotationError(ValueError):
    """A malformed annotation, or one that does not fit the op it is attached to.

    The message quotes the annotation and, when the fault has a place, draws a caret under it.
    ``column`` is 1-based (None when the fault is not at one place, e.g. a wrong argument count).
    """

    def __init__(self, text: str, column: Optional[int], reason: str, op_name: Optional[str] = None):
        self.text = text
        self.column = column
        self.reason = reason
        self.op_name = op_name
        super().__init__(self._format())

    def _format(self) -> str:
        prefix = f"op '{self.op_name}': " if self.op_name else ""
        if self.column is None:
            return f"{prefix}bad annotation '{self.text}': {self.reason}"
        # Tabs and newlines would push the caret out of line with the text, so echo them as spaces.
        shown = "".join(" " if c.isspace() else c for c in self.text)
        caret = " " * (self.column - 1) + "^"
        return (
            f"{prefix}bad annotation '{self.text}': {self.reason} at column {self.column}\n"
            f"  {shown}\n"
            f"  {caret}"
        )

    def for_op(self, op_name: str) -> "AnnotationError":
        """The same error, with the op that carries the annotation named in the message."""
        return AnnotationError(self.text, self.column, self.reason, op_name)


class AnnotationShapeError(ValueError):
    """An annotation that does not agree with the shapes an op was called with."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dim:
    """One named dim. ``reduce`` implies ``splittable``: a '+' dim is split, then summed."""

    name: str
    splittable: bool
    reduce: bool

    @property
    def suffix(self) -> str:
        if self.reduce:
            return SUFFIX_REDUCE
        return "" if self.splittable else SUFFIX_NO_SPLIT

    def __str__(self) -> str:
        return self.name + self.suffix


@dataclass(frozen=True)
class TensorSpec:
    """The spec of one argument or result.

    ``dims`` has one entry per tensor dim; each entry is a group of one or more Dims whose sizes
    multiply to the tensor dim. A 'scalar' (0-dim tensor, written ``1``) has ``dims == ()``; an
    'other' (non-tensor, written ``?``) has ``dims is None``.
    """

    dims: Optional[tuple[tuple[Dim, ...], ...]]
    kind: Literal["tensor", "scalar", "other"]

    @property
    def is_tensor(self) -> bool:
        return self.kind != "other"

    @property
    def rank(self) -> Optional[int]:
        return None if self.dims is None else len(self.dims)

    def __str__(self) -> str:
        if self.kind == "other":
            return "?"
        if self.kind == "scalar":
            return "1"
        return " ".join(_group_str(group) for group in self.dims)


def _group_str(group: tuple[Dim, ...]) -> str:
    if len(group) == 1:
        return str(group[0])
    return "(" + " ".join(str(d) for d in group) + ")"


Shape = Optional[Sequence[int]]


@dataclass(frozen=True)
class Annotation:
    """A parsed annotation. ``text`` is what the user wrote; ``str()`` gives a canonical form."""

    text: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def _dims(self):
        for spec in self.inputs + self.outputs:
            for group in spec.dims or ():
                yield from group

    def _unique_dims(self) -> list[Dim]:
        # Suffixes are consistent per name (the parser guarantees it), so the first Dim seen for
        # a name stands for all of them. Order of first appearance keeps results predictable.
        seen: dict[str, Dim] = {}
        for dim in self._dims():
            seen.setdefault(dim.name, dim)
        return list(seen.values())

    def names(self) -> tuple[str, ...]:
        """Every dim name, in order of first appearance."""
        return tuple(d.name for d in self._unique_dims())

    def splittable_names(self) -> tuple[str, ...]:
        """Names the planner may split: plain ones and '+' ones (which then need a reduction)."""
        return tuple(d.name for d in self._unique_dims() if d.splittable)

    def reduce_names(self) -> tuple[str, ...]:
        """Names whose split leaves partial sums in the outputs ('+')."""
        return tuple(d.name for d in self._unique_dims() if d.reduce)

    def dim_size_map(
        self,
        input_shapes: Sequence[Shape],
        output_shapes: Sequence[Shape],
        op_name: Optional[str] = None,
    ) -> dict[str, int]:
        """Size of every name, from the shapes of the op's arguments and results.

        Each entry of ``input_shapes`` / ``output_shapes`` is a tuple of ints for a tensor and
        None for a non-tensor. Raises AnnotationShapeError where the shapes disagree with the
        annotation or with each other.
        """
        return _SizeSolver(self, input_shapes, output_shapes, op_name).solve()

    def __str__(self) -> str:
        left = ", ".join(str(s) for s in self.inputs)
        right = ", ".join(str(s) for s in self.outputs)
        return f"{left} -> {right}"


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # 'name', '(', ')', ',', '->', '?', '1'
    pos: int  # 0-based index of the token's first character in the annotation text
    name: str = ""
    suffix: str = ""


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def _tokenize(text: str) -> list[_Token]:
    def fail(pos: int, reason: str) -> NoReturn:
        raise AnnotationError(text, pos + 1, reason)

    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),?":
            tokens.append(_Token(c, i))
            i += 1
        elif c == "-":
            if not text.startswith("->", i):
                fail(i, "'-' is only allowed as part of '->'")
            tokens.append(_Token("->", i))
            i += 2
        elif c == ">":
            fail(i, "'>' is only allowed as part of '->'")
        elif c in _SUFFIXES:
            fail(i, f"suffix '{c}' must directly follow a dim name")
        elif _is_word_char(c):
            i = _read_word(text, i, tokens, fail)
        else:
            fail(i, f"unexpected character {c!r}")
    return tokens


def _read_word(text: str, start: int, tokens: list[_Token], fail) -> int:
    """Read a dim name with its suffix (or the scalar marker '1'); return the index after it."""
    n = len(text)
    end = start
    while end < n and _is_word_char(text[end]):
        end += 1
    word = text[start:end]
    if word == "1":
        if end < n and text[end] in _SUFFIXES:
            fail(end, "'1' (a 0-dim tensor) cannot carry a suffix")
        tokens.append(_Token("1", start))
        return end
    if word.isdigit():
        fail(start, f"'{word}' is not a dim name; the only number allowed is '1' (a 0-dim tensor)")
    if not word[0].isalpha():
        fail(start, f"dim name '{word}' must start with a letter")

    suffix_end = end
    while suffix_end < n and text[suffix_end] in _SUFFIXES:
        suffix_end += 1
    suffix = text[end:suffix_end]
    if len(suffix) > 1:
        fail(end + 1, f"'{word}{suffix}' has more than one suffix; use either '^' or '+'")

    # Anything glued to the name that is not grammar is a mistake in the name or its suffix.
    # Punctuation reads as a suffix attempt ('h*'), anything else as a bad name character ('hé').
    if suffix_end < n:
        c = text[suffix_end]
        if not (c.isspace() or c in "(),-?>"):
            if c.isascii() and c in string.punctuation:
                fail(suffix_end, f"unknown suffix {c!r} on '{word}' (use '^' = not splittable, "
                                 f"'+' = partial sums)")
            fail(suffix_end, f"bad character {c!r} in dim name '{word}{suffix}' "
                             f"(names are ASCII letters, digits and '_')")

    tokens.append(_Token("name", start, name=word, suffix=suffix))
    return suffix_end


# --------------------------------------------------------------------------- parser


@dataclass
class _Occurrence:
    """Where a name appears: used for the consistency checks and their error columns."""

    token: _Token
    side: str  # 'input' | 'output'


def parse_annotation(text: str) -> Annotation:
    """Parse ``text``; raise AnnotationError pointing at the first fault."""
    if not isinstance(text, str):
        raise TypeError(f"an annotation must be a str, got {type(text).__name__}")
    tokens = _tokenize(text)

    def fail(pos: int, reason: str) -> NoReturn:
        raise AnnotationError(text, pos + 1, reason)

    arrows = [i for i, t in enumerate(tokens) if t.kind == "->"]
    if not arrows:
        fail(len(text), "missing '->' between inputs and outputs")
    if len(arrows) > 1:
        fail(tokens[arrows[1]].pos, "more than one '->'")
    arrow = tokens[arrows[0]]
    left, right = tokens[: arrows[0]], tokens[arrows[0] + 1:]
    if not left:
        fail(arrow.pos, "no input specs before '->'")
    if not right:
        fail(arrow.pos, "no output specs after '->'")

    occurrences: list[_Occurrence] = []
    inputs = _parse_side(left, "input", occurrences, fail)
    outputs = _parse_side(right, "output", occurrences, fail)
    _check_names(occurrences, fail)
    return Annotation(text, inputs, outputs)


def _parse_side(tokens: list[_Token], side: str, occurrences: list[_Occurrence], fail):
    """Split one side at its commas and turn each piece into a TensorSpec."""
    specs: list[TensorSpec] = []
    items: list = []  # the current spec: tokens for names/'?'/'1', lists of tokens for groups
    group: Optional[list[_Token]] = None  # names inside an open '(' ...
    group_open: Optional[_Token] = None  # ... and the '(' itself, for error columns
    last_comma: Optional[_Token] = None

    for tok in tokens:
        if tok.kind == "(":
            if group is not None:
                fail(tok.pos, "nested '(' (a group holds dim names only)")
            group, group_open = [], tok
        elif tok.kind == ")":
            if group is None:
                fail(tok.pos, "unmatched ')'")
            if not group:
                fail(group_open.pos, "empty group '()'")
            items.append(group)
            group, group_open = None, None
        elif tok.kind == ",":
            if group is not None:
                fail(group_open.pos, "unclosed '('")
            if not items:
                fail(tok.pos, "empty tensor spec before ','")
            specs.append(_make_spec(items, side, occurrences, fail))
            items, last_comma = [], tok
        elif tok.kind == "name":
            (group if group is not None else items).append(tok)
        else:  # '?' or '1'
            if group is not None:
                fail(tok.pos, f"'{tok.kind}' cannot appear inside a group")
            items.append(tok)

    if group is not None:
        fail(group_open.pos, "unclosed '('")
    if not items:
        # Only reachable after a trailing comma: an empty side is rejected before we get here.
        fail(last_comma.pos, "empty tensor spec after ','")
    specs.append(_make_spec(items, side, occurrences, fail))
    return tuple(specs)


def _make_spec(items: list, side: str, occurrences: list[_Occurrence], fail) -> TensorSpec:
    markers = [it for it in items if isinstance(it, _Token) and it.kind in ("?", "1")]
    if markers:
        if len(items) > 1:
            what = "a non-tensor argument" if markers[0].kind == "?" else "a 0-dim tensor"
            fail(markers[0].pos,
                 f"'{markers[0].kind}' stands alone for {what}; it cannot be mixed with dims")
        return TensorSpec(None, "other") if markers[0].kind == "?" else TensorSpec((), "scalar")

    dims = []
    for item in items:
        group_tokens = item if isinstance(item, list) else [item]
        seen_in_group: set[str] = set()
        for tok in group_tokens:
            if tok.name in seen_in_group:
                # (n n) has no single size for n that division could recover; say so early.
                fail(tok.pos, f"'{tok.name}' appears twice in one group")
            seen_in_group.add(tok.name)
            occurrences.append(_Occurrence(tok, side))
        dims.append(tuple(_dim(tok) for tok in group_tokens))
    return TensorSpec(tuple(dims), "tensor")


def _dim(tok: _Token) -> Dim:
    return Dim(tok.name, splittable=tok.suffix != SUFFIX_NO_SPLIT, reduce=tok.suffix == SUFFIX_REDUCE)


def _describe_suffix(suffix: str) -> str:
    return {"": "no suffix", "^": "'^'", "+": "'+'"}[suffix]


def _check_names(occurrences: list[_Occurrence], fail) -> None:
    """Rules that span the whole annotation: one suffix per name, '+' only on contracted dims,
    new output dims only as '^'."""
    first: dict[str, _Token] = {}
    input_names: set[str] = set()
    for occ in occurrences:  # occurrences are in text order, so errors point at the later one
        tok = occ.token
        if tok.name in first and first[tok.name].suffix != tok.suffix:
            prev = first[tok.name]
            # The caret marks this occurrence; the first one is named by its suffix, which is
            # enough to find it without a second column number muddling the message.
            fail(tok.pos,
                 f"'{tok.name}' has {_describe_suffix(tok.suffix)} here but "
                 f"{_describe_suffix(prev.suffix)} where it first appears; "
                 f"a name must carry the same suffix everywhere")
        first.setdefault(tok.name, tok)
        if occ.side == "input":
            input_names.add(tok.name)

    for occ in occurrences:
        if occ.side != "output":
            continue
        tok = occ.token
        if tok.suffix == SUFFIX_REDUCE:
            fail(tok.pos,
                 f"'{tok.name}+' appears in an output; '+' marks a contracted dim, one that "
                 f"appears only in inputs")
        if tok.name not in input_names and tok.suffix != SUFFIX_NO_SPLIT:
            fail(tok.pos,
                 f"output dim '{tok.name}' appears in no input; a dim the op creates must be "
                 f"marked '^' ('{tok.name}^')")


# --------------------------------------------------------------------------- shapes


def check_shapes(
    annotation: Annotation,
    input_shapes: Sequence[Shape],
    output_shapes: Sequence[Shape],
    op_name: Optional[str],
) -> dict[str, int]:
    """Check traced shapes against ``annotation``; return the size of every dim name.

    Each shape entry is a tuple of ints for a tensor argument and None for a non-tensor one.
    Raises AnnotationShapeError naming the op, the annotation, the argument and the dim.
    """
    return annotation.dim_size_map(input_shapes, output_shapes, op_name)


def _fmt_shape(shape: Shape) -> str:
    if shape is None:
        return "non-tensor"
    try:
        sizes = tuple(shape)
    except TypeError:  # not a shape at all; still print it, since this runs inside an error path
        return repr(shape)
    return "(" + ", ".join(str(s) for s in sizes) + ("," if len(sizes) == 1 else "") + ")"


class _SizeSolver:
    """Fixes each name's size from single-name dims first, then solves groups by division."""

    def __init__(self, annotation: Annotation, input_shapes, output_shapes, op_name):
        self.annotation = annotation
        self.input_shapes = list(input_shapes)
        self.output_shapes = list(output_shapes)
        self.op_name = op_name
        self.sizes: dict[str, int] = {}
        self.where: dict[str, str] = {}  # name -> where its size was first fixed, for messages

    def fail(self, detail: str) -> NoReturn:
        op = f"op '{self.op_name}'" if self.op_name else "op"
        ins = ", ".join(_fmt_shape(s) for s in self.input_shapes)
        outs = ", ".join(_fmt_shape(s) for s in self.output_shapes)
        raise AnnotationShapeError(
            f"{op} with annotation '{self.annotation.text}': {detail}\n"
            f"  input shapes:  [{ins}]\n"
            f"  output shapes: [{outs}]"
        )

    def solve(self) -> dict[str, int]:
        tensor_dims = self._check_args()
        groups = []
        for label, group, size in tensor_dims:
            if len(group) == 1:
                self._fix(group[0].name, size, label)
            else:
                groups.append((label, group, size))
        self._solve_groups(groups)
        return {name: self.sizes[name] for name in self.annotation.names()}

    def _check_args(self) -> list[tuple[str, tuple[Dim, ...], int]]:
        """Count, kind and rank checks; returns (label, group, size) for every tensor dim."""
        out = []
        for side, specs, shapes in (
            ("input", self.annotation.inputs, self.input_shapes),
            ("output", self.annotation.outputs, self.output_shapes),
        ):
            if len(shapes) != len(specs):
                listed = ", ".join(str(s) for s in specs)
                self.fail(f"annotation has {len(specs)} {side}(s) ({listed}) "
                          f"but the op has {len(shapes)}")
            for i, (spec, shape) in enumerate(zip(specs, shapes)):
                arg = f"{side} {i}"
                if spec.kind == "other":
                    if shape is not None:
                        self.fail(f"{arg} is annotated '?' (a non-tensor) but is a tensor of "
                                  f"shape {_fmt_shape(shape)}")
                    continue
                if shape is None:
                    self.fail(f"{arg} is annotated '{spec}' (a tensor) but is not a tensor")
                shape = self._as_ints(arg, shape)
                if len(shape) != spec.rank:
                    self.fail(f"{arg} has rank {len(shape)} (shape {_fmt_shape(shape)}) but "
                              f"its spec '{spec}' has {spec.rank} dim(s)")
                for d, (group, size) in enumerate(zip(spec.dims, shape)):
                    out.append((f"{arg} dim {d} '{_group_str(group)}'", group, size))
        return out

    def _as_ints(self, arg: str, shape) -> tuple[int, ...]:
        try:
            # operator.index accepts ints and int-like sizes but rejects floats, unlike int().
            sizes = tuple(operator.index(s) for s in shape)
        except TypeError:
            self.fail(f"{arg} has a shape that is not a sequence of ints: {shape!r}")
        if any(s < 0 for s in sizes):
            self.fail(f"{arg} has a negative size in shape {_fmt_shape(sizes)}")
        return sizes

    def _fix(self, name: str, size: int, label: str) -> None:
        if name not in self.sizes:
            self.sizes[name] = size
            self.where[name] = label
        elif self.sizes[name] != size:
            self.fail(f"'{name}' is {size} in {label} but {self.sizes[name]} in "
                      f"{self.where[name]}")

    def _solve_groups(self, groups: list) -> None:
        # A group may hold one name whose size nothing else fixes; solving it can fix a name in
        # another group, so repeat until a pass makes no progress.
        pending = groups
        while pending:
            still, progress = [], False
            for label, group, size in pending:
                unknown = [d.name for d in group if d.name not in self.sizes]
                known = math.prod(self.sizes[d.name] for d in group if d.name in self.sizes)
                if not unknown:
                    if known != size:
                        self.fail(f"{label} has size {size} but {self._product(group)} = {known}"
                                  f"{self._sources(group)}")
                elif known == 0 and size != 0:
                    # A zero among the known sizes makes the product 0 whatever the rest are.
                    self.fail(f"{label} has size {size} but {self._product(group)} = 0"
                              f"{self._sources(group)}")
                elif len(unknown) == 1 and known != 0:
                    if size % known:
                        self.fail(f"{label} has size {size}, which {self._product(group)} cannot "
                                  f"give: {size} is not divisible by {known}"
                                  f"{self._sources(group)}")
                    self._fix(unknown[0], size // known, f"{label} (solved by division)")
                    progress = True
                else:
                    still.append((label, group, size))
            pending = still
            if not progress:
                break

        for label, group, size in pending:
            unknown = [d.name for d in group if d.name not in self.sizes]
            if len(unknown) == 1:  # a 0-sized dim: 0 = 0 * anything
                reason = "the other names multiply to 0, so any size fits"
            else:
                reason = "at most one name in a group may have a size not fixed elsewhere"
            names = ", ".join(f"'{n}'" for n in unknown)
            self.fail(f"cannot determine {names} in {label} (size {size}): {reason}")

    def _product(self, group: tuple[Dim, ...]) -> str:
        """'n*l = 2*8' style text for group errors; '?' for a size not known yet."""
        names = "*".join(d.name for d in group)
        values = "*".join(str(self.sizes[d.name]) if d.name in self.sizes else "?" for d in group)
        return f"{names} = {values}"

    def _sources(self, group: tuple[Dim, ...]) -> str:
        """' (n from input 0 dim 0 'n'; ...)': where the known sizes in a group came from."""
        sources = "; ".join(f"{d.name} from {self.where[d.name]}" for d in group
                            if d.name in self.where)
        return f" ({sources})" if sources else ""


# --------------------------------------------------------------------------- registry


# Qualified op name -> annotation. Module-level because ops register at import time, from
# wherever they are defined, and the tracer looks them up later by the name it sees in the graph.
_REGISTRY: dict[str, Annotation] = {}


def register_op_annotation(op_name: str, annotation: str) -> Annotation:
    """Parse ``annotation`` and record it for ``op_name`` ('namespace::name').

    Registering the same annotation again is a no-op (modules may be re-imported); registering a
    different one for the same op is refused, since the planner would silently change behaviour.
    """
    if not isinstance(op_name, str) or "::" not in op_name:
        raise ValueError(f"op name {op_name!r} must be qualified as 'namespace::name', "
                         f"e.g. 'deepseek::moe_route'")
    parsed = _parse_for_op(op_name, annotation)
    existing = _REGISTRY.get(op_name)
    if existing is not None:
        # Compare structure, not text, so spacing differences are not a conflict.
        if (existing.inputs, existing.outputs) == (parsed.inputs, parsed.outputs):
            return existing
        raise ValueError(f"op '{op_name}' already has annotation '{existing.text}'; refusing to "
                         f"replace it with '{annotation}'")
    _REGISTRY[op_name] = parsed
    return parsed


def get_op_annotation(op_name: str) -> Optional[Annotation]:
    return _REGISTRY.get(op_name)


def registered_ops() -> dict[str, Annotation]:
    """A copy of the registry, so callers cannot change it by accident."""
    return dict(_REGISTRY)


def _parse_for_op(op_name: str, annotation: str) -> Annotation:
    try:
        return parse_annotation(annotation)
    except AnnotationError as e:
        raise e.for_op(op_name) from None


Op = TypeVar("Op")


def annotate(annotation: str) -> Callable[[Op], Op]:
    """Decorator form of :func:`register_op_annotation` for ``torch.library.custom_op``::

        @annotate("n l h^, e^ h^ -> (n l) k^, (n l) k^")
        @torch.library.custom_op("deepseek::moe_route", mutates_args=())
        def moe_route(x, w): ...

    It also checks the annotation against the op's schema (argument and result counts, tensor
    vs non-tensor arguments), which the string-only registration cannot see. The op is returned
    unchanged.
    """

    def register(op: Op) -> Op:
        op_name, schema = _op_name_and_schema(op)
        parsed = _parse_for_op(op_name, annotation)
        _check_against_schema(op_name, parsed, schema)
        register_op_annotation(op_name, annotation)
        return op

    return register


def _op_name_and_schema(op):
    # torch.library.custom_op returns a CustomOpDef: `_qualname` is "namespace::name" and the
    # schema lives on its OpOverload. An OpOverload (torch.ops.ns.name.default) has it directly.
    qualname = getattr(op, "_qualname", None)
    if isinstance(qualname, str) and hasattr(op, "_opoverload"):
        return qualname, op._opoverload._schema
    schema = getattr(op, "_schema", None)
    if schema is not None and isinstance(getattr(schema, "name", None), str):
        return schema.name, schema
    raise TypeError(
        f"annotate() needs a torch.library.custom_op (or an OpOverload), got {op!r}; "
        f"put @annotate(...) above @torch.library.custom_op(...)"
    )


def _check_against_schema(op_name: str, parsed: Annotation, schema) -> None:
    import torch  # only here: parsing and shape checks must not need torch

    def fail(reason: str) -> NoReturn:
        raise AnnotationError(parsed.text, None, f"{reason}; the op's schema is {schema}",
                              op_name)

    if len(schema.arguments) != len(parsed.inputs):
        fail(f"{len(parsed.inputs)} input spec(s) for {len(schema.arguments)} argument(s)")
    if len(schema.returns) != len(parsed.outputs):
        fail(f"{len(parsed.outputs)} output spec(s) for {len(schema.returns)} result(s)")

    def check(kind: str, i: int, spec: TensorSpec, jit_type) -> None:
        # Only the clear cases: a plain Tensor must not be '?', and a type that cannot hold a
        # tensor must be '?'. Optional[Tensor] and lists may be either, depending on the call.
        is_tensor = isinstance(jit_type, torch.TensorType)
        may_hold_tensor = is_tensor or "Tensor" in str(jit_type)
        if is_tensor and not spec.is_tensor:
            fail(f"{kind} {i} is a Tensor but is annotated '?'")
        if not may_hold_tensor and spec.is_tensor:
            fail(f"{kind} {i} is a {jit_type}, not a tensor, so it must be annotated '?' "
                 f"(not '{spec}')")

    for i, (spec, arg) in enumerate(zip(parsed.inputs, schema.arguments)):
        check("input", i, spec, arg.type)
    for i, (spec, ret) in enumerate(zip(parsed.outputs, schema.returns)):
        check("output", i, spec, ret.type)
