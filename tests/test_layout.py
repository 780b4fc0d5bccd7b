"""The shape of the code: which module may import which, and dvc.yaml's honesty about it.

The import graph is read from the source with `ast` (every `import`, also the
lazy ones inside functions), so it needs nothing installed and sees what a
stage can run, not only what it imports at start-up.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
# The parts of pipeline/ (its subpackages) and which parts each may import; "core" is the
# handful of shared modules at pipeline/'s top. The model imports nothing of the project.
PARTS = ("data", "model", "checkpoint", "export", "evaluate", "train")
MAY_IMPORT = {
    "core": {"core", "data", "model", "checkpoint", "export"},  # params → data.sources; verify re-hashes all
    "data": {"core", "data"},
    "model": {"model"},
    "checkpoint": {"core", "model", "checkpoint"},
    "export": {"core", "data", "model", "checkpoint", "export"},
    "evaluate": {"core", "data", "model", "checkpoint", "export", "evaluate"},
    "train": {"core", "data", "model", "checkpoint", "export", "evaluate", "train"},
}
# Core modules that are leaves: everything may import them, they import no part.
CORE_LEAVES = {"pipeline.errors", "pipeline.atomic", "pipeline.hardware"}
MAX_TOP_LEVEL_MODULES = 8
MAX_MODULES_PER_PART = 16


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@functools.cache
def imports(module: str) -> set[str]:
    """The project modules (pipeline.*, stages.*) that `module`'s source imports, anywhere in it."""
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import distributed` names a module; `from pipeline.x import f` names x.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and _exists(n)}
    return found - {module}


@functools.cache
def external_imports(module: str) -> set[str]:
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _exists(name: str) -> bool:
    return (REPO / Path(*name.split("."))).with_suffix(".py").is_file()


def part_of(module: str) -> str:
    """`pipeline.data.store.reader` → "data"; a module at pipeline/'s top → "core"."""
    names = module.split(".")
    return names[1] if len(names) > 2 else "core"


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    return seen


def all_modules() -> list[str]:
    return sorted(module_of(p) for package in PACKAGES for p in (REPO / package).rglob("*.py")
                  if p.name != "__init__.py")


def stage_modules() -> dict[str, str]:
    """`mm` subcommand → the stages module that implements it, as the CLI registers them."""
    from stages import cli

    cli._register()
    return {c.name: c.callback.__module__ for c in cli.app.registered_commands}


# ---------------------------------------------------------------------------


def test_every_stage_depends_on_the_pipeline_modules_it_runs():
    """dvc.yaml's stages and bench/dvc.yaml's optional one (deps there relative to the root: wdir ..)."""
    bench = yaml.safe_load((REPO / "bench" / "dvc.yaml").read_text())["stages"]
    stages = {**yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"],
              **{f"bench/{k}": v for k, v in bench.items()}}
    commands = stage_modules()
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        argv = stage["cmd"].split()
        assert argv[0] == "mm" and argv[1] in commands, f"stage {name}: {stage['cmd']!r} is not an mm command"
        runs = {f"{m.replace('.', '/')}.py" for m in closure(commands[argv[1]]) if m.startswith("pipeline.")}
        declared = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        # A folder dep (pipeline/model) covers every file under it.
        uncovered = {f for f in runs if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in declared)}
        if uncovered:
            missing[name] = sorted(uncovered)
    assert not missing, f"dvc.yaml stages lack these deps (the stage runs them): {missing}"


def test_training_reruns_when_any_train_default_changes():
    """dvc.yaml's train stage tracks the whole `train` section, and params.yaml lists every key of it."""
    import dataclasses

    from pipeline.params import TrainParams

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "train" in dvc["stages"]["train"]["params"]
    listed = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert sorted(f.name for f in dataclasses.fields(TrainParams) if f.name not in listed) == []


def test_pipeline_never_reaches_stages_typer_or_dvc():
    for module in all_modules():
        if module.startswith("pipeline."):
            assert not {m for m in imports(module) if m.startswith("stages.")}, module
            assert not external_imports(module) & {"stages", "typer", "dvc"}, module


def test_model_and_what_it_imports_use_only_torch():
    """pipeline/model/transformer.py and every project module it reaches import only torch and the stdlib."""
    import sys

    reached = closure("pipeline.model.transformer")
    assert {"pipeline.model.transformer", "pipeline.model.doc_attention", "pipeline.model.fused_loss"} <= reached
    for module in reached:
        assert module.startswith("pipeline."), module
        outside = external_imports(module) - {"pipeline", "torch"} - set(sys.stdlib_module_names)
        assert not outside, (module, sorted(outside))


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """`a → b` for each import in `graph` (pipeline modules only) that MAY_IMPORT does not allow."""
    found = []
    for module, targets in graph.items():
        for target in targets:
            if not (module.startswith("pipeline.") and target.startswith("pipeline.")) or target in CORE_LEAVES:
                continue
            if part_of(target) not in MAY_IMPORT[part_of(module)]:
                found.append(f"{module} → {target}")
            elif module in CORE_LEAVES:
                found.append(f"{module} → {target} (a core leaf imports no part)")
    return sorted(found)


def test_parts_import_only_what_their_layer_allows():
    """data never reaches train, export or evaluate; export and evaluate reach checkpoints through
    pipeline.checkpoint, never the training loop; the model imports nothing of the project."""
    graph = {m: imports(m) for m in all_modules() if m.startswith("pipeline.")}
    assert {part_of(m) for m in graph} == {"core", *PARTS}
    assert layering_violations(graph) == []


def test_layering_rule_catches_a_data_module_importing_training():
    made_up = {"pipeline.data.fake": {"pipeline.train.loop", "pipeline.data.sampler"},
               "pipeline.export.fake": {"pipeline.train.setup", "pipeline.checkpoint.format"},
               "pipeline.model.fake": {"pipeline.errors", "pipeline.model.transformer", "pipeline.params"},
               "pipeline.errors": {"pipeline.data.sources"}}
    assert layering_violations(made_up) == [
        "pipeline.data.fake → pipeline.train.loop",
        "pipeline.errors → pipeline.data.sources (a core leaf imports no part)",
        "pipeline.export.fake → pipeline.train.setup",
        "pipeline.model.fake → pipeline.params"]


def test_data_commands_run_only_data_modules():
    commands = stage_modules()
    for command in ("sample", "tokenizer", "tokenize"):
        reached = {m for m in closure(commands[command]) if m.startswith("pipeline.")}
        assert {part_of(m) for m in reached} <= {"core", "data"}, (command, sorted(reached))


def test_pipeline_is_a_few_parts_each_a_handful_of_modules():
    top = [p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)
    for init in (REPO / "pipeline").rglob("__init__.py"):
        folder = init.parent
        modules = [p.name for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_PART, (folder.name, len(modules))
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
    assert sorted(p.name for p in (REPO / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted(PARTS)


def test_pipeline_names_no_stages_module():
    """Not even as a string (a module name handed to a launcher): the CLI passes its own name in."""
    for module in all_modules():
        if module.startswith("pipeline."):
            source = (REPO / Path(*module.split(".")).with_suffix(".py")).read_text(encoding="utf-8")
            strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)]
            assert not [s for s in strings if isinstance(s, str) and s.startswith("stages.")], module


def test_every_command_binds_set_to_one_name():
    import typing

    from stages import cli

    cli._register()
    for command in cli.app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        for name, hint in hints.items():
            # Under Annotated, typer.Option's first positional argument (kept as `default`) is the flag name.
            metas = getattr(hint, "__metadata__", ())
            decls = [d for m in metas for d in (getattr(m, "default", None), *(getattr(m, "param_decls", None) or ()))]
            if "--set" in decls:
                assert name == "sets", (command.name, name)
        assert "set" not in hints and "set_" not in hints, command.name


def test_import_graph_has_no_cycle():
    graph = {m: imports(m) for m in all_modules()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " → ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_design_picture_names_every_pipeline_module():
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    picture = text.split("## Modules", 1)[1].split("```")[1]
    words = set(picture.replace(",", " ").replace("(", " ").replace(")", " ").split())
    missing = [m for m in all_modules() if m.startswith("pipeline.") and m.split(".")[-1] not in words]
    assert not missing, f"docs/design.md's module picture lacks {missing}"


# Words about how the work was organised, or pointers to files users of the repository
# do not have. Built from pieces so that this file does not match them itself (the path one
# joined at run time, so its compiled file does not either).
UNWANTED = ["/".join(("shared", "")), r"DESIGN" + r"\.md", r"[Ii]ssue" + r" [0-9]", r"[Mm]ust" + r".show",
            r"this" + " task", r"this" + " machine"]


def test_repository_stands_on_its_own():
    import re

    pattern = re.compile("|".join(UNWANTED))
    files = [REPO / "README.md", REPO / "dvc.yaml", REPO / "Makefile", REPO / "pyproject.toml", REPO / "params.yaml"]
    for folder in ("docs", "pipeline", "stages", "tests", "bench"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml", ".txt")]
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


MAX_FILE_LINES = 360  # the rule is ~350; a few lines of slack so that a comment does not force a split
MAX_FUNCTION_LINES = 80
REASON = "long because"  # in a comment on the line before a longer function's def (or decorators), or its docstring


def test_pipeline_files_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (REPO / "pipeline").rglob("*.py")}
    too_long = sorted(f"{name}: {n} lines" for name, n in sizes.items() if n > MAX_FILE_LINES)
    assert not too_long, too_long


def unexplained_long_functions(source: str) -> list[str]:
    """`name() N lines` for each function over MAX_FUNCTION_LINES with no "long because" in a comment
    on the line right above its def (above its decorators, if any) or in its docstring."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = lines[first - 2] if first >= 2 else ""
        said = ("#" in above and REASON in above.lower()) or REASON in (ast.get_docstring(node) or "").lower()
        if not said:
            found.append(f"{node.name}() {length} lines")
    return found


def test_pipeline_functions_stay_small():
    too_long = [f"{path.name}: {f}" for path in sorted((REPO / "pipeline").rglob("*.py"))
                for f in unexplained_long_functions(path.read_text(encoding="utf-8"))]
    assert not too_long, too_long


def test_function_length_rule_needs_the_reason_right_above_or_in_the_docstring():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # 80 lines + the def
    explained = f"# long because: one table, row by row\n@staticmethod\ndef g():\n{body}\n"
    documented = f'def h():\n    """Long because the steps share ten locals."""\n{body}\n'
    comment_too_far = f"# long because of nothing\nX = 1\ndef k():\n{body}\n"
    short = "def s():\n" + "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    assert unexplained_long_functions(f"def f():\n{body}\n") == ["f() 81 lines"]
    assert unexplained_long_functions(explained + documented + short) == []
    assert unexplained_long_functions(comment_too_far) == ["k() 81 lines"]
