"""`_core.pyi` is what `python -m ria._stubgen` generates from the built extension, and
it declares exactly the extension's public names and parameters (a stubtest of our own:
offline and fast)."""

from __future__ import annotations

import ast
import inspect

import pytest

from ria import _core, _stubgen


def test_the_stub_is_what_the_generator_writes():
    assert _stubgen.STUB.read_text() == _stubgen.render(_core), (
        "python/ria/_core.pyi is stale: run `python -m ria._stubgen`"
    )


def test_the_check_mode_reports_a_stale_stub(tmp_path, capsys):
    stale = tmp_path / "_core.pyi"
    stale.write_text(_stubgen.render(_core).replace("seed: int", "seed: str"))
    assert _stubgen.main(["--check", "--output", str(stale)]) == 1
    assert "+    seed: int" in capsys.readouterr().out
    assert _stubgen.main(["--output", str(stale)]) == 0
    assert _stubgen.main(["--check", "--output", str(stale)]) == 0


def _stub() -> ast.Module:
    return ast.parse(_stubgen.STUB.read_text())


def _params(fn: ast.FunctionDef) -> list[str]:
    """Parameter names, keyword-only ones after a "*", as `inspect` would list them."""
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.kwonlyargs:
        names += ["*", *(a.arg for a in args.kwonlyargs)]
    return names


def _runtime_params(obj: object) -> list[str]:
    names: list[str] = []
    for p in inspect.signature(obj).parameters.values():  # type: ignore[arg-type]
        if p.kind is p.KEYWORD_ONLY and "*" not in names:
            names.append("*")
        names.append(p.name)
    return names


def _public_stub_names(tree: ast.Module) -> dict[str, ast.stmt]:
    names: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return {n: v for n, v in names.items() if not n.startswith("_") or n == "__version__"}


def test_the_stub_declares_exactly_the_extensions_public_names():
    declared = _public_stub_names(_stub())
    assert set(declared) == {*_stubgen.public_names(_core), "__version__"}


def test_every_function_has_the_extensions_parameters():
    for name, node in _public_stub_names(_stub()).items():
        if isinstance(node, ast.FunctionDef):
            assert _params(node) == _runtime_params(getattr(_core, name)), name


@pytest.mark.parametrize("name", ["SearchOptions", "PermutationResult"])
def test_every_class_has_the_extensions_members_and_constructor(name):
    node = _public_stub_names(_stub())[name]
    assert isinstance(node, ast.ClassDef)
    cls = getattr(_core, name)
    defs = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    properties = {
        n for n, fn in defs.items() if any(ast.unparse(d) == "property" for d in fn.decorator_list)
    }
    getters, methods = _stubgen.members(cls)
    assert properties == set(getters)
    assert set(defs) - properties - {"__init__"} == set(methods)
    for method in methods:
        assert _params(defs[method]) == _runtime_params(getattr(cls, method)), method
    if cls.__text_signature__:
        assert _params(defs["__init__"]) == ["self", *_runtime_params(cls)]
    else:
        assert "__init__" not in defs
        with pytest.raises(TypeError):
            cls()


def test_search_option_types_and_defaults_in_the_stub_come_from_rust():
    tree = _stub()
    init = next(
        fn
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "SearchOptions"
        for fn in node.body
        if isinstance(fn, ast.FunctionDef) and fn.name == "__init__"
    )
    types = {a.arg: ast.unparse(a.annotation) for a in init.args.kwonlyargs if a.annotation}
    pairs = zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True)
    defaults = {a.arg: ast.literal_eval(d) for a, d in pairs if d is not None}
    assert types == _core.SearchOptions._option_types
    assert defaults == _core.SearchOptions().to_dict()
    kwargs = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Kwargs"))
    fields = {
        ast.unparse(s.target): ast.unparse(s.annotation)
        for s in kwargs.body
        if isinstance(s, ast.AnnAssign)
    }
    assert fields == types
