"""The keyword arguments a config's `_target_` takes, read from its source: importing it would load torch."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def keyword_arguments(target: str) -> set[str] | None:
    """The keyword arguments that `_target_` `target` (`lightning.Trainer`) takes, read from its source without
    importing it (that would load torch); None where they cannot be told (it takes any, or is not found)."""
    module, _, name = target.rpartition(".")
    definition = _find_definition(module, name)
    if definition is None:
        return None
    return _arguments(*definition)


def _arguments(tree: ast.Module, module: str, definition: ast.AST, depth: int = 0) -> set[str] | None:
    """The keyword arguments of a class or function `definition` of `module` (parsed: `tree`); None if unknown."""
    if _is_function(definition):
        return None if definition.args.kwarg is not None else _parameter_names(definition)
    if not isinstance(definition, ast.ClassDef):
        return None
    init = next((node for node in definition.body if _is_function(node) and node.name == "__init__"), None)
    if init is not None and init.args.kwarg is None:
        return _parameter_names(init)
    # No `__init__` of its own, or one passing `**kwargs` on: its base's too, where it has one base.
    if len(definition.bases) != 1 or depth >= 10:
        return None
    base = _find_definition(module, ast.unparse(definition.bases[0]), tree)
    inherited = _arguments(*base, depth + 1) if base is not None else None
    if inherited is None or init is None:
        return inherited
    return _parameter_names(init) | inherited


def _parameter_names(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    arguments = function.args
    return {argument.arg for argument in [*arguments.args, *arguments.kwonlyargs] if argument.arg != "self"}


def _is_function(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))


def _find_definition(
    module: str, name: str, tree: ast.Module | None = None, depth: int = 0
) -> tuple[ast.Module, str, ast.AST] | None:
    """Where `name` (`Trainer`, or dotted: `L.Callback`) is defined, following the imports that bring it into
    `module`, and a package's lazy exports (`wavenet._lazy`): the defining module's tree and name, and the
    definition."""
    if depth > 10:
        return None
    if tree is None:
        tree = _module_tree(module)
        if tree is None:
            return None
    head, _, rest = name.partition(".")
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return tree, module, node
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if (alias.asname or alias.name) != head:
                    continue
                if isinstance(node, ast.Import):  # `import lightning as L`: `L.Callback`
                    if rest:
                        source, _, attribute = f"{alias.name}.{rest}".rpartition(".")
                        return _find_definition(source, attribute, depth=depth + 1)
                    return None
                source = _absolute_module(module, node, tree)
                if source is None:
                    return None
                if rest:  # `from lightning import pytorch as pl`: `pl.Callback`
                    return _find_definition(f"{source}.{alias.name}", rest, depth=depth + 1)
                return _find_definition(source, alias.name, depth=depth + 1)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and not rest:  # lazy exports
            for key, value in zip(node.value.keys, node.value.values):
                exported = isinstance(key, ast.Constant) and key.value == name
                if exported and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return _find_definition(value.value, name, depth=depth + 1)
    return None


def _absolute_module(module: str, node: ast.ImportFrom, tree: ast.Module) -> str | None:
    if not node.level:
        return node.module
    package = module if getattr(tree, "is_package", False) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _module_tree(module: str) -> ast.Module | None:
    """The parsed source of `module`, found without importing it or its packages."""
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: its package is found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        paths = [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []
    else:
        inner = Path(*rest.split("."))
        folders = [Path(folder) for folder in spec.submodule_search_locations or ()]
        paths = [path for folder in folders for path in (folder / inner / "__init__.py", folder / f"{inner}.py")]
    for path in paths:
        if path.is_file():
            try:
                tree = ast.parse(path.read_text())
            except (OSError, SyntaxError, ValueError):
                return None
            tree.is_package = path.name == "__init__.py"  # where `from . import` starts
            return tree
    return None
