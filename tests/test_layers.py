"""The layers of the library (docs/architecture.md, "Layers"): no module imports one above it,
function-level imports included. Read from the source with ``ast``, so a lazy import inside a
function counts as much as one at the top."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top; a module may import its own layer and those below.
LAYERS = [
    # facts and plumbing with no fastddpm dependency of note: vocabularies, coefficient tables,
    # devices, outputs, interrupts, process groups, datasets, how the model runs
    {"checks", "step", "schedule", "devices", "outputs", "interrupts", "distributed", "data", "acceleration"},
    # the two implementations of every op: the PyTorch reference and the Triton kernels
    {"reference", "kernels", "kernels.common", "kernels.noise", "kernels.q_sample", "kernels.reverse_step", "kernels.dpm_solver", "kernels.unipc",
     "kernels.timestep_embedding"},
    # the ops: checks, then a backend
    {"ops"},
    # what is built on the ops: samplers, models, losses, images, metrics
    {"samplers", "models", "losses", "imaging", "metrics"},
    # the runner and what reads or writes runs
    {"sampling", "evaluation", "checkpoint", "shards"},
    # training, the diffusers drop-ins and pipelines
    {"training", "schedulers", "schedulers.common", "schedulers.ddpm", "schedulers.ddim", "schedulers.dpm_solver",
     "schedulers.unipc", "pipelines"},
    # the command line and the package's front
    {"cli", "__main__", "commands", "commands.common", "commands.sample", "commands.train", "commands.eval",
     "commands.merge", "commands.demo", ""},
]
# Constants anyone may read from the package front.
ALLOWED = {("", "__version__")}


def _modules():
    for path in sorted((ROOT / "fastddpm").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT / "fastddpm").with_suffix("").parts), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "kernels." + path.stem, path


def _name(module: str) -> str:
    return module[: -len(".__init__")] if module.endswith(".__init__") else ("" if module == "__init__" else module)


def _imports(module: str, path: Path):
    """(imported module, imported name or None) of every import of fastddpm code, anywhere in the file."""
    package = module.split(".")[:-1]
    if path.name == "__init__.py":
        package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "fastddpm":
                target = node.module[len("fastddpm."):] if node.module != "fastddpm" else ""
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                yield (candidate if _layer_of(candidate) is not None else target), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastddpm":
                    yield alias.name[len("fastddpm."):] if alias.name != "fastddpm" else "", None


def _layer_of(module: str):
    module = "kernels" + module[len("kernels"):] if module.startswith("kernels") else module
    for level, members in enumerate(LAYERS):
        if module in members:
            return level
    return None


def test_every_module_has_a_layer():
    missing = [_name(module) for module, _ in _modules() if _layer_of(_name(module)) is None]
    assert not missing, f"place these in LAYERS (and docs/architecture.md): {missing}"


def test_no_module_imports_one_above_it():
    violations = []
    for module, path in _modules():
        name = _name(module)
        mine = _layer_of(name)
        for target, imported in _imports(module, path):
            if (target, imported) in ALLOWED or target == name:
                continue
            theirs = _layer_of(target)
            assert theirs is not None, f"{name} imports {target!r}, which has no layer"
            if theirs > mine:
                violations.append(f"{name or 'fastddpm'} (layer {mine}) imports {target or 'fastddpm'} (layer {theirs})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a module of layer 0 importing the runner is reported."""
    fake = tmp_path / "step.py"
    fake.write_text("def f():\n    from .sampling import sample\n")
    found = list(_imports("step", fake))
    assert ("sampling", "sample") in found and _layer_of("sampling") > _layer_of("step")


def test_no_function_is_longer_than_120_lines():
    """Code one can hold in one's head (issue 24): every function of the library, the kernels and
    the benchmarks fits in 120 lines."""
    long = []
    for folder in ("fastddpm", "kernels", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 120:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_setup_ships_every_package():
    """A package missing from setup.py's list is left out of the wheel: `pip install .` then fails on
    import, which the editable install of the tests never shows."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    listed = next(ast.literal_eval(keyword.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for keyword in node.keywords if keyword.arg == "packages")
    on_disk = {".".join(("fastddpm",) + path.parent.relative_to(ROOT / "fastddpm").parts).rstrip(".")
               for path in (ROOT / "fastddpm").rglob("__init__.py")}
    on_disk.add("fastddpm.kernels")
    assert set(listed) == on_disk
