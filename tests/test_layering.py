"""The layering of the packages, read from the source (ast), so that a violation fails here:

1. `modeling/` imports nothing from `compiler/` or `runtime/` (nor `options`, which imports it),
   except the annotation grammar `compiler/annotations.py`, which is a leaf: it imports no module of
   this project.
2. `compiler/` imports nothing from `runtime/`.
3. `runtime/` and `compiler/` reach DeepSeek only through the spec: they import from `modeling` only
   the package itself, `modeling.spec`, `modeling.hf_adapter`, `modeling.kernels` and
   `modeling.loading`, and name no module attribute of the model, neither as an attribute
   (`x.mlp`) nor in a string path (`"model.embed_tokens"`), nor its classes.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = {"modeling", "compiler", "runtime", "options", "errors", "train", "merge_ckpt", "bookcorpus"}
MODELING_MAY_IMPORT = {"compiler.annotations", "errors"}
SPEC_SURFACE = {"modeling", "modeling.spec", "modeling.hf_adapter", "modeling.kernels", "modeling.loading"}
# module attributes of the DeepSeek models (modeling_deepseek.py, training_form.py)
MODEL_ATTRIBUTES = {
    "mlp", "experts", "shared_experts", "embed_tokens", "lm_head", "self_attn", "kv_b_proj", "q_proj", "q_a_proj",
    "q_b_proj", "kv_a_proj_with_mqa", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj_E2FD", "down_proj_EDF", "input_layernorm", "post_attention_layernorm", "rotary_emb",
    "run_layers", "head_logits", "share_across_heads", "num_key_value_heads", "attention_fn", "forward_with_head",
    "aux_loss_grad_scale", "last_aux_loss",
}
# op family names that are also attribute names: a string naming the family ("ops.experts") is fine
FAMILY_NAMES = {"experts", "shared_experts"}
MODEL_CLASSES = {
    "MoEBlock", "MergedExperts", "RouterGate", "DeepseekMLP", "DeepseekMoE", "MoEGate", "DeepseekV2Attention",
    "DeepseekAttention", "DeepseekDecoderLayer", "DeepseekRMSNorm", "DeepseekV2ForCausalLM", "DeepseekForCausalLM",
}


def _imports(tree, package):
    """Absolute names of the project modules a file imports (relative imports resolved in `package`)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.append(base)
            # `from modeling import spec` imports the module modeling.spec (but load_config is a name)
            names += [f"{base}.{alias.name}" for alias in node.names
                      if os.path.isfile(os.path.join(REPO, *base.split("."), alias.name + ".py"))]
    return [n for n in names if n.split(".")[0] in PROJECT_PACKAGES]


def _docstring_nodes(tree):
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def _names_model_internals(tree):
    """(line, what) for every model attribute or class named in the code (docstrings excepted)."""
    found = []
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES:
            found.append((node.lineno, f"attribute .{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in MODEL_CLASSES:
            found.append((node.lineno, f"class {node.id}"))
        elif isinstance(node, ast.alias) and node.name in MODEL_CLASSES:
            found.append((getattr(node, "lineno", 0), f"import of {node.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            parts = set(node.value.replace("/", ".").split("."))
            hits = sorted(parts & (MODEL_ATTRIBUTES - FAMILY_NAMES))
            if hits and "." in node.value:
                found.append((node.lineno, f"string path {node.value!r}"))
    return found


def violations(relpath, source):
    """Every layering rule `source` (the file at `relpath` from the repository root) breaks."""
    tree = ast.parse(source, filename=relpath)
    package = os.path.dirname(relpath).replace(os.sep, ".")
    top = relpath.split(os.sep)[0]
    imported = _imports(tree, package)
    out = []
    if top == "modeling":
        out += [f"{relpath}: modeling imports {m}" for m in imported
                if m.split(".")[0] in {"compiler", "runtime", "options"} and m not in MODELING_MAY_IMPORT]
    if relpath == os.path.join("compiler", "annotations.py"):
        out += [f"{relpath}: the annotation grammar must be a leaf but imports {m}" for m in imported]
    if top == "compiler":
        out += [f"{relpath}: compiler imports {m}" for m in imported if m.split(".")[0] == "runtime"]
    if top in ("compiler", "runtime"):
        out += [f"{relpath}: imports {m}, which is not the spec's surface ({sorted(SPEC_SURFACE)})"
                for m in imported if m.split(".")[0] == "modeling" and m not in SPEC_SURFACE]
        out += [f"{relpath}:{line}: names the model's {what}; ask modeling.spec"
                for line, what in _names_model_internals(tree)]
    return out


def _project_files():
    for top in ("modeling", "compiler", "runtime"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), path


def test_the_tree_obeys_the_layering():
    found = []
    for relpath, path in _project_files():
        with open(path) as f:
            found += violations(relpath, f.read())
    assert found == [], "\n".join(found)


def test_the_checker_fails_on_planted_violations():
    """Each rule, broken once in a planted file, is reported (so the test above can fail)."""
    planted = {
        os.path.join("modeling", "x.py"): ("from runtime.trainer import train\n", "modeling imports runtime"),
        os.path.join("modeling", "y.py"): ("import compiler.search\n", "modeling imports compiler.search"),
        os.path.join("compiler", "annotations.py"): ("from modeling import spec\n", "must be a leaf"),
        os.path.join("compiler", "z.py"): ("from runtime import mesh\n", "compiler imports runtime"),
        os.path.join("runtime", "a.py"): ("def f(m):\n    return m.mlp.experts\n", "attribute .experts"),
        os.path.join("runtime", "b.py"): ("P = 'model.embed_tokens.weight'\n", "string path"),
        os.path.join("runtime", "c.py"): ("from modeling.training_form import MoEBlock\n", "not the spec's surface"),
        os.path.join("compiler", "d.py"): ("def f(x):\n    return isinstance(x, MoEBlock)\n", "class MoEBlock"),
        os.path.join("runtime", "e.py"): ("from ..modeling import modeling_deepseek\n", "not the spec's surface"),
    }
    for relpath, (source, expected) in planted.items():
        found = violations(relpath, source)
        assert any(expected in v for v in found), (relpath, found)
    # what is allowed stays allowed
    assert violations(os.path.join("modeling", "training_form.py"), "from compiler.annotations import annotate\n") == []
    assert violations(os.path.join("runtime", "f.py"), "from modeling import spec\nx = spec.family_modules\n") == []
    assert violations(os.path.join("runtime", "g.py"), '"""mentions lm_head.weight in prose"""\n') == []
