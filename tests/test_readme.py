"""The README against the code, so that the two cannot drift apart unnoticed: every
`python -m vit_jax.MODULE ...` line of its shell blocks (and of the modules' and presets' usage
docstrings) parses with that command's own parser,
every name its Python blocks and its inline code use exists, every call in its Python blocks
passes arguments the function takes, and the files and `make` targets it names are there. (Its
two main commands, `make demo` and `make test`, run in CI.)"""

import argparse
import ast
import importlib
import inspect
import json
import pathlib
import re
import subprocess
import sys

import pytest

from vit_jax import commands, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODULES = [
    *("benchmark", "checkpoint", "commands", "evaluate", "figures", "input_pipeline", "models"),
    *("parallel", "predict", "resnet", "summary", "train", "variants", "visualize"),
]
MODEL_FIELDS = models.VisionTransformer.__dataclass_fields__


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _command_lines() -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python -m vit_jax.MODULE ...` in the shell blocks: continued lines
    joined, comments, quotes, line-continuation backslashes and `...` placeholders dropped (the
    multi-host block's two columns become two command lines that mix both hosts' flags)."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"(?=python -m vit_jax\.)", line)[1:]:
                words = part.split(" #")[0].replace('"', " ").split()
                args = [w for w in words[3:] if w not in ("\\", "...")]
                lines.append((words[2].removeprefix("vit_jax."), args))
    return lines


def _docstring_command_lines() -> list[tuple[str, list[str]]]:
    """(module, argv) of the usage lines in the package's and the presets' docstrings (a line that
    begins with `python -m vit_jax.MODULE`), with `[...]` optional-argument brackets and a comment
    or `(...)` note after two spaces dropped."""
    lines = []
    for path in sorted([*ROOT.glob("vit_jax/*.py"), *ROOT.glob("configs/*.py")]):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in re.findall(r"^\s*python -m vit_jax\..*$", docstring, re.M):
            words = re.split(r"\s{2,}[#(]", line.strip())[0].replace("[", " ").replace("]", " ")
            words = words.split()
            lines.append((words[2].removeprefix("vit_jax."), words[3:]))
    return lines


README_LINES = _command_lines()
COMMAND_LINES = README_LINES + _docstring_command_lines()


def test_the_readme_has_a_command_line_for_every_command():
    shown = {module for module, _ in README_LINES}
    assert shown == {module.removeprefix("vit_jax.") for module, _ in commands.COMMANDS.values()}
    assert len(README_LINES) >= 25 and len(COMMAND_LINES) >= len(README_LINES) + 25


class _Parsed(BaseException):  # (a BaseException: no command's error handling catches it)
    pass


@pytest.mark.parametrize(
    "module, argv",
    [line for line in COMMAND_LINES if line[0] != "train"],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_argparse_command_lines_parse(module, argv, monkeypatch, capsys):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    main = importlib.import_module(f"vit_jax.{module}").main
    try:
        main(list(argv))
    except SystemExit:  # argparse's usage error
        pytest.fail(f"python -m vit_jax.{module} {' '.join(argv)}: {capsys.readouterr().err}")
    except _Parsed:
        return
    pytest.fail(f"vit_jax.{module}.main never parsed its arguments")


# Train's command lines get absl's and ml_collections' flag parsing, one after another in a process
# of their own: both register flags globally, and a --config FILE defines its --config.KEY flags
# from sys.argv when it is defined, so each line defines train's flags anew and deletes them after.
_PARSE_TRAIN_FLAGS = """
import json, sys
from absl import flags
from vit_jax import train

builtin = set(flags.FLAGS)
for argv in json.loads(sys.argv[1]):
    try:
        argv = ["vit-train", *argv]
        sys.argv = given = train._model_override_args(argv)[0]
        train._define_flags()
        rest = flags.FLAGS(given)[1:]
        config = train.config_from_flags(flags.FLAGS)
        print(json.dumps([argv[1:], rest, config.model, config.dataset]), flush=True)
    except BaseException as e:
        print(json.dumps([argv[1:], f"{type(e).__name__}: {e}"]), flush=True)
    flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - builtin:
        delattr(flags.FLAGS, name)
"""


def test_train_command_lines_parse():
    lines = [argv for module, argv in COMMAND_LINES if module == "train"]
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_TRAIN_FLAGS, json.dumps(lines)],
        capture_output=True,
        text=True,
        cwd=ROOT,  # (the README's --config files are relative to the checkout)
        timeout=300,
    )
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(results) == len(lines), result.stderr
    for argv, *parsed in results:
        assert len(parsed) == 3, f"python -m vit_jax.train {' '.join(argv)}: {parsed[0]}"
        rest, model, dataset = parsed
        assert rest == [], f"{argv}: arguments left over: {rest}"
        for flag, value in (("--model", model), ("--dataset", dataset)):
            if flag in argv:
                assert argv[argv.index(flag) + 1] == value, (argv, flag, value)
    parsed = {tuple(argv): rest for argv, *rest in results}
    # A preset's own settings come through: configs/cifar100.py:ViT-B_16 trains ViT-B_16 on it.
    preset = ("--config", "configs/cifar100.py:ViT-B_16", "--config.total_steps=2000")
    assert parsed[preset][1:] == ["ViT-B_16", "cifar100"]


def _python_blocks() -> list[ast.Module]:
    return [ast.parse(block) for block in _blocks("python")]


def _vit_jax_names(tree: ast.Module) -> dict[str, object]:
    """The names a block imports from vit_jax, bound to what they are."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vit_jax":  # `import vit_jax[.x] [as y]`
                    bound = alias.name if alias.asname else "vit_jax"
                    names[alias.asname or "vit_jax"] = importlib.import_module(bound)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vit_jax":
            module = importlib.import_module(node.module)
            for alias in node.names:
                value = getattr(module, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = value
    return names


def _resolve(node: ast.expr, names: dict[str, object]) -> tuple[bool, object]:
    """(found, object) for a Name or an attribute chain rooted at a vit_jax import; (False, None)
    for anything else. A missing attribute fails the test, naming the chain."""
    if isinstance(node, ast.Name):
        return (True, names[node.id]) if node.id in names else (False, None)
    if isinstance(node, ast.Attribute):
        found, value = _resolve(node.value, names)
        if not found:
            return False, None
        assert hasattr(value, node.attr), f"the README uses {ast.unparse(node)}, which is gone"
        return True, getattr(value, node.attr)
    return False, None


def _check_calls(tree: ast.AST, names: dict[str, object]) -> list[str]:
    """Checks every vit_jax name and call in `tree` (see `_resolve`); returns the calls checked."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node, names)
        if not isinstance(node, ast.Call):
            continue
        found, function = _resolve(node.func, names)
        if not found:
            continue
        try:
            bound = inspect.signature(function).bind(
                *node.args, **{k.arg: k.value for k in node.keywords}
            )
        except TypeError as e:
            pytest.fail(f"the README calls {ast.unparse(node)}: {e}")
        # get_model(..., **overrides) and load_pretrained_model pass these on to the model.
        unknown = set(bound.arguments.get("overrides", {})) - set(MODEL_FIELDS)
        assert not unknown, f"the README calls {ast.unparse(node)}: no model option {unknown}"
        calls.append(ast.unparse(node.func))
    return calls


def test_python_blocks_use_names_and_arguments_that_exist():
    calls = []
    for tree in _python_blocks():
        names = _vit_jax_names(tree)
        assert names, ast.unparse(tree)[:80]
        calls += _check_calls(tree, names)
    # get_model, load_pretrained_model, checkpoint.load/save, train.train_and_evaluate, ...
    assert len(calls) >= 12 and "train.train_and_evaluate" in calls, calls


def test_inline_code_names_and_calls_exist():
    """Inline code such as `parallel.cpu_blocks` or `checkpoint.resize_posemb(posemb, (gh, gw),
    has_class_token)`: module names as `from vit_jax import MODULE` binds them."""
    import vit_jax

    names = {"vit_jax": vit_jax} | {m: importlib.import_module(f"vit_jax.{m}") for m in MODULES}
    pattern = re.compile(rf"(?<![\w./])(?:vit_jax\.)?({'|'.join(MODULES)})\.([A-Za-z_]\w*)")
    checked, calls = set(), []
    for span in re.findall(r"`([^`\n]+)`", README):
        if "/" in span or span.startswith(("python ", "~")):  # paths and command lines
            continue
        try:
            tree = ast.parse(span)
        except SyntaxError:
            tree = None
        if tree is not None:
            calls += _check_calls(tree, names)
        for module, attr in pattern.findall(span):
            assert hasattr(names[module], attr), f"the README names `{span}`: {module}.{attr}"
            checked.add(f"{module}.{attr}")
    assert len(checked) >= 15 and len(calls) >= 5, (sorted(checked), calls)


def test_files_and_make_targets_it_names_exist():
    paths = set(re.findall(r"(?<![\w/])((?:\.ci|configs|colab|tests|vit_jax)/[\w./-]*\w)", README))
    placeholders = {p for p in paths if re.search(r"/[A-Z]+\.", p)}  # configs/X.py
    missing = [p for p in sorted(paths - placeholders) if not (ROOT / p).exists()]
    assert not missing and len(paths) >= 10, (missing, sorted(paths))
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", README, re.M))
    assert named and named <= targets, named - targets
