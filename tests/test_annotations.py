"""Tests for compiler/annotations.py: grammar, error positions, shape checks and the registry."""

import pytest
import torch

from compiler.annotations import (
    Annotation,
    AnnotationError,
    AnnotationShapeError,
    Dim,
    TensorSpec,
    annotate,
    check_shapes,
    get_op_annotation,
    parse_annotation,
    register_op_annotation,
    registered_ops,
)

DESIGN = "n l h^, e^ h^ -> (n l) k^, (n l) k^"
MATMUL = "m k+, k+ n -> m n"


def split(name):
    return Dim(name, splittable=True, reduce=False)


def fixed(name):
    return Dim(name, splittable=False, reduce=False)


def reduced(name):
    return Dim(name, splittable=True, reduce=True)


# --------------------------------------------------------------------------- valid annotations


def test_design_example_structure():
    a = parse_annotation(DESIGN)
    assert a.text == DESIGN
    routed = TensorSpec(((split("n"), split("l")), (fixed("k"),)), "tensor")
    assert a.inputs == (
        TensorSpec(((split("n"),), (split("l"),), (fixed("h"),)), "tensor"),
        TensorSpec(((fixed("e"),), (fixed("h"),)), "tensor"),
    )
    assert a.outputs == (routed, routed)
    assert a.names() == ("n", "l", "h", "e", "k")
    assert a.splittable_names() == ("n", "l")
    assert a.reduce_names() == ()
    assert str(a) == DESIGN


def test_matmul_contracted_dim_is_reduce():
    a = parse_annotation(MATMUL)
    assert a.inputs[0].dims == ((split("m"),), (reduced("k"),))
    assert a.inputs[1].dims == ((reduced("k"),), (split("n"),))
    assert a.outputs[0].dims == ((split("m"),), (split("n"),))
    assert a.reduce_names() == ("k",)
    # A '+' dim may still be split; the split just leaves partial sums.
    assert a.splittable_names() == ("m", "k", "n")


def test_group_with_individual_suffixes():
    a = parse_annotation("(n l^) d -> (n l^) d")
    assert a.inputs[0].dims == ((split("n"), fixed("l")), (split("d"),))
    assert a.inputs[0].rank == 2
    assert a.outputs == a.inputs


def test_non_tensor_and_scalar_args():
    a = parse_annotation("n d, ?, 1 -> n d, 1")
    assert [s.kind for s in a.inputs] == ["tensor", "other", "scalar"]
    assert a.inputs[1] == TensorSpec(None, "other")
    assert a.inputs[2] == TensorSpec((), "scalar")
    assert a.inputs[1].rank is None and a.inputs[2].rank == 0
    assert a.outputs[1].kind == "scalar"
    assert str(a) == "n d, ?, 1 -> n d, 1"


def test_names_with_digits_and_underscores():
    a = parse_annotation("seq_len2 h_dim^, E_1^ h_dim^ -> seq_len2 E_1^")
    assert a.names() == ("seq_len2", "h_dim", "E_1")
    assert a.inputs[1].dims == ((fixed("E_1"),), (fixed("h_dim"),))


def test_whitespace_is_free_around_punctuation():
    a = parse_annotation("  a  b ,c->a b")
    assert str(a) == "a b, c -> a b"
    assert parse_annotation("a\tb -> (a\tb)").outputs[0].dims == ((split("a"), split("b")),)


def test_reduction_over_a_dim_of_one_input():
    a = parse_annotation("n k+ -> n")
    assert a.reduce_names() == ("k",)


def test_new_output_dim_marked_fixed_is_allowed():
    a = parse_annotation("n h -> n k^")
    assert a.outputs[0].dims[1] == (fixed("k"),)


# --------------------------------------------------------------------------- malformed annotations


def caret_column(message: str) -> int:
    """1-based column of the caret on the message's last line (the text line is indented by 2)."""
    last = message.splitlines()[-1]
    assert last.strip() == "^", message
    return len(last) - 2


MALFORMED = [
    # (annotation, 1-based column of the fault, words the message must contain)
    ("n l h^, e^ h^ -> (n l k^", 18, "unclosed '('"),  # the '(' itself
    ("n l h^", 7, "missing '->'"),  # one past the end: where the arrow was expected
    ("a -> b -> c", 8, "more than one '->'"),
    ("-> a", 1, "no input specs"),
    ("a ->", 3, "no output specs"),
    ("a,,b -> a", 3, "empty tensor spec"),
    (",a -> a", 1, "empty tensor spec"),
    ("a, -> a", 2, "empty tensor spec"),
    ("a -> a,", 7, "empty tensor spec"),
    ("(n, l) -> n", 1, "unclosed '('"),
    ("n l) -> n", 4, "unmatched ')'"),
    ("n -> n)", 7, "unmatched ')'"),
    ("((n l) k) -> n", 2, "nested '('"),
    ("n () -> n", 3, "empty group '()'"),
    ("1n -> n", 1, "must start with a letter"),
    ("_n -> n", 1, "must start with a letter"),
    ("n 22 -> n", 3, "not a dim name"),
    ("né -> n", 2, "bad character"),
    ("n-x -> n", 2, "'->'"),
    ("n $ -> n", 3, "unexpected character"),
    ("h* -> h", 2, "unknown suffix '*'"),
    ("h^^ -> h^", 3, "more than one suffix"),
    ("h+^ -> h", 3, "more than one suffix"),
    ("h ^ -> h", 3, "must directly follow a dim name"),
    ("(n l)^ -> n", 6, "must directly follow a dim name"),
    ("n h^, h -> n", 7, "same suffix"),
    ("m k+, k n -> m n", 7, "same suffix"),
    ("m k+, k+ n -> m n k+", 19, "'+' marks a contracted dim"),
    ("n -> n k", 8, "appears in no input"),
    ("n -> (n k)", 9, "appears in no input"),
    ("n ? -> n", 3, "'?' stands alone"),
    ("1 n -> n", 1, "'1' stands alone"),
    ("n -> n 1", 8, "'1' stands alone"),
    ("(n ?) -> n", 4, "inside a group"),
    ("1^ -> 1", 2, "cannot carry a suffix"),
    ("(n n) -> n", 4, "twice in one group"),
]


@pytest.mark.parametrize("text,column,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_annotation_points_at_the_fault(text, column, reason):
    with pytest.raises(AnnotationError) as info:
        parse_annotation(text)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert f"bad annotation '{text}'" in message
    assert reason in message
    assert err.column == column
    assert f"at column {column}" in message
    assert caret_column(message) == column
    # The text is echoed on the line above the caret so the caret lines up with it.
    assert message.splitlines()[-2] == "  " + "".join(" " if c.isspace() else c for c in text)


def test_error_format_matches_the_documented_shape():
    with pytest.raises(AnnotationError) as info:
        parse_annotation("n l h^, e^ h^ -> (n l k^")
    assert str(info.value) == (
        "bad annotation 'n l h^, e^ h^ -> (n l k^': unclosed '(' at column 18\n"
        "  n l h^, e^ h^ -> (n l k^\n"
        "                   ^"
    )


def test_non_string_annotation_is_a_type_error():
    with pytest.raises(TypeError):
        parse_annotation(None)


# --------------------------------------------------------------------------- shapes


def test_check_shapes_design_example():
    a = parse_annotation(DESIGN)
    sizes = check_shapes(a, [(2, 8, 16), (4, 16)], [(16, 2), (16, 2)], "deepseek::moe_route")
    assert sizes == {"n": 2, "l": 8, "h": 16, "e": 4, "k": 2}
    # Same answer through the Annotation helper, and torch.Size is accepted as a shape.
    assert a.dim_size_map([torch.Size([2, 8, 16]), (4, 16)], [(16, 2), (16, 2)]) == sizes


def test_group_solved_by_division():
    a = parse_annotation("(n l) d, l -> (n l) d")
    assert check_shapes(a, [(12, 5), (4,)], [(12, 5)], "t::op") == {"n": 3, "l": 4, "d": 5}


def test_groups_solved_one_after_another():
    # (b c) has two unknowns until (a b) has fixed b, so solving must iterate.
    a = parse_annotation("(b c), (a b), a -> (a b c)")
    assert check_shapes(a, [(12,), (6,), (2,)], [(24,)], "t::op") == {"b": 3, "c": 4, "a": 2}


def test_non_tensor_and_scalar_args_in_shapes():
    a = parse_annotation("n, ?, 1 -> n, 1")
    assert check_shapes(a, [(4,), None, ()], [(4,), ()], "t::op") == {"n": 4}


def shape_error(annotation, input_shapes, output_shapes, op_name="t::op"):
    with pytest.raises(AnnotationShapeError) as info:
        check_shapes(parse_annotation(annotation), input_shapes, output_shapes, op_name)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"op '{op_name}'" in message
    assert f"annotation '{annotation}'" in message
    return message


def test_wrong_rank():
    message = shape_error(DESIGN, [(2, 8), (4, 16)], [(16, 2), (16, 2)], "deepseek::moe_route")
    assert "input 0 has rank 2" in message and "'n l h^' has 3 dim(s)" in message


def test_wrong_arg_count():
    message = shape_error(DESIGN, [(2, 8, 16)], [(16, 2), (16, 2)])
    assert "2 input(s)" in message and "the op has 1" in message
    message = shape_error(DESIGN, [(2, 8, 16), (4, 16)], [(16, 2)])
    assert "2 output(s)" in message and "the op has 1" in message


def test_inconsistent_sizes_name_both_places():
    message = shape_error(DESIGN, [(2, 8, 16), (4, 17)], [(16, 2), (16, 2)])
    assert "'h' is 17 in input 1 dim 1" in message
    assert "16 in input 0 dim 2" in message


def test_group_product_disagrees():
    message = shape_error("n l -> (n l)", [(3, 4)], [(13,)])
    assert "output 0 dim 0 '(n l)' has size 13" in message
    assert "n*l = 3*4 = 12" in message


def test_group_that_does_not_divide():
    message = shape_error("(n l), l -> (n l)", [(12,), (5,)], [(12,)])
    assert "input 0 dim 0 '(n l)'" in message
    assert "12 is not divisible by 5" in message


def test_group_that_cannot_be_determined():
    message = shape_error("(n l) -> (n l)", [(6,)], [(6,)])
    assert "cannot determine 'n', 'l'" in message and "input 0 dim 0" in message


def test_tensor_where_non_tensor_expected_and_back():
    message = shape_error("n, ? -> n", [(4,), (3,)], [(4,)])
    assert "input 1 is annotated '?'" in message
    message = shape_error("n, m -> n", [(4,), None], [(4,)])
    assert "input 1 is annotated 'm' (a tensor) but is not a tensor" in message


def test_scalar_spec_needs_a_0_dim_tensor():
    message = shape_error("n -> 1", [(4,)], [(1,)])
    assert "output 0 has rank 1" in message


def test_shape_error_without_op_name():
    with pytest.raises(AnnotationShapeError, match="has rank"):
        parse_annotation("n -> n").dim_size_map([(1, 2)], [(1,)])


# --------------------------------------------------------------------------- registry


def test_register_and_get():
    a = register_op_annotation("annot_test::reg_basic", MATMUL)
    assert isinstance(a, Annotation)
    assert get_op_annotation("annot_test::reg_basic") is a
    assert registered_ops()["annot_test::reg_basic"] is a
    assert get_op_annotation("annot_test::never_registered") is None


def test_registered_ops_is_a_copy():
    register_op_annotation("annot_test::reg_copy", "n -> n")
    registered_ops().pop("annot_test::reg_copy")
    assert get_op_annotation("annot_test::reg_copy") is not None


def test_same_annotation_again_is_fine_different_one_is_refused():
    first = register_op_annotation("annot_test::reg_twice", "m k+, k+ n -> m n")
    # Spacing differs, structure does not: not a conflict.
    assert register_op_annotation("annot_test::reg_twice", "m k+,k+ n->m n") is first
    with pytest.raises(ValueError, match="annot_test::reg_twice.*already has annotation"):
        register_op_annotation("annot_test::reg_twice", "m k, k n -> m n k")
    assert get_op_annotation("annot_test::reg_twice") is first


def test_malformed_registration_names_the_op():
    with pytest.raises(AnnotationError) as info:
        register_op_annotation("annot_test::reg_bad", "n l h^, e^ h^ -> (n l k^")
    message = str(info.value)
    assert message.startswith("op 'annot_test::reg_bad': bad annotation")
    assert caret_column(message) == 18
    assert get_op_annotation("annot_test::reg_bad") is None


def test_unqualified_op_name_is_refused():
    with pytest.raises(ValueError, match="namespace::name"):
        register_op_annotation("moe_route", "n -> n")


# --------------------------------------------------------------------------- annotate()


@annotate("t h^, e^ h^, ? -> t k^, t k^")
@torch.library.custom_op("annot_test::my_op", mutates_args=())
def my_op(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(x @ w.t(), k, dim=-1)


@my_op.register_fake
def _(x, w, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)


def test_annotate_registers_a_custom_op_and_returns_it():
    assert isinstance(my_op, torch._library.custom_ops.CustomOpDef)
    a = get_op_annotation("annot_test::my_op")
    assert a is not None and str(a) == "t h^, e^ h^, ? -> t k^, t k^"
    # The op still works, and its fake implementation's shapes agree with the annotation.
    values, indices = my_op(torch.randn(5, 8), torch.randn(4, 8), 2)
    assert values.shape == (5, 2) and indices.shape == (5, 2)
    x, w = torch.empty(5, 8, device="meta"), torch.empty(4, 8, device="meta")
    outs = torch.ops.annot_test.my_op(x, w, 2)
    sizes = check_shapes(a, [x.shape, w.shape, None], [o.shape for o in outs], "annot_test::my_op")
    assert sizes == {"t": 5, "h": 8, "e": 4, "k": 2}


def test_annotate_refuses_an_annotation_that_does_not_fit_the_schema():
    @torch.library.custom_op("annot_test::schema_op", mutates_args=())
    def schema_op(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.clone()

    with pytest.raises(AnnotationError, match="op 'annot_test::schema_op'.*1 input spec"):
        annotate("a -> a")(schema_op)
    with pytest.raises(AnnotationError, match="input 0 is a Tensor but is annotated '\\?'"):
        annotate("?, ? -> a^")(schema_op)
    with pytest.raises(AnnotationError, match="input 1 is a int"):
        annotate("a, b -> a")(schema_op)
    assert get_op_annotation("annot_test::schema_op") is None
    assert annotate("a, ? -> a")(schema_op) is schema_op
    assert get_op_annotation("annot_test::schema_op") is not None


def test_annotate_names_the_op_for_a_malformed_annotation():
    @torch.library.custom_op("annot_test::bad_text_op", mutates_args=())
    def bad_text_op(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    with pytest.raises(AnnotationError, match="op 'annot_test::bad_text_op': bad annotation"):
        annotate("a -> a b")(bad_text_op)


def test_annotate_needs_a_custom_op():
    with pytest.raises(TypeError, match="above @torch.library.custom_op"):
        annotate("a -> a")(lambda x: x)
