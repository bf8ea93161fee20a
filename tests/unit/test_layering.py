"""The layout follows the flow: no package imports one later in the flow, so there are no cycles.

Every import of archtune code counts, at module level or inside a function (a deferred import is
still a dependency); only `if TYPE_CHECKING:` imports are left out. docs/ARCHITECTURE.md shows the
same order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import archtune

SRC = Path(archtune.__file__).resolve().parent

# Shared leaves first, then the flow: config -> plan -> models -> patches -> adapters -> data -> train -> cli.
FLOW: tuple[tuple[str, ...], ...] = (
    ("errors", "registry", "assets"),  # leaves: import no other archtune package
    ("config",),
    ("plugins",),  # the plugin registry (names), read by the plan; plugins' code loads later, by name
    ("families",),
    ("plan",),
    ("models",),
    ("patches",),
    ("adapters",),
    ("moe",),
    ("data",),
    ("train",),
    ("diagnostics",),
    ("export",),
    ("docs",),
    ("cli",),
    ("__main__",),
)
RANK = {name: i for i, group in enumerate(FLOW) for name in group}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "archtune" and len(parts) > 1 else None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports() -> list[tuple[str, str, str]]:
    """(importing file, its package, imported package) for every archtune import across packages."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else None
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                if node.module == "archtune":  # `from archtune import x`
                    targets = [f"archtune.{a.name}" for a in node.names]
            for target in targets:
                there = _package(target)
                if here and there and there != here:
                    found.append((str(rel), here, there))
    return found


def test_every_package_has_a_place_in_the_flow():
    packages = {p.name.removesuffix(".py") for p in SRC.iterdir()
                if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert packages - set(RANK) == set(), "add the new package to FLOW here and to docs/ARCHITECTURE.md"


def test_no_package_imports_a_later_one():
    backwards = sorted({f"{file}: {here} imports {there}" for file, here, there in imports()
                        if RANK[there] >= RANK[here]})
    assert backwards == []


def test_the_check_sees_imports_inside_functions():
    # The control: a deferred import is found like a top-level one.
    assert ("cli/commands.py", "cli", "train") in imports()


# ---------------------------------------------------------------- modules: no circles

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """{module: the archtune modules it imports} (`from pkg import mod` counts as importing `pkg.mod`;
    relative imports resolved; `if TYPE_CHECKING:` imports left out: they never run)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for here, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = here if path.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rpartition(".")[0]
                if target in files and target != here:
                    edges.setdefault(here, set()).add(target)
    return edges


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's strongly
    connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_the_circle_check_finds_a_circle():
    # The control: a circle through a third module is found, a chain is not.
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": {"c"}}) == []
    assert ("archtune.train.recipe", "archtune.train.assembly") in {(a, b) for a, bs in module_imports().items() for b in bs}


def test_no_module_imports_itself_through_others():
    assert import_circles(module_imports()) == []


# ---------------------------------------------------------------- modules: no private names across

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_taken(sources: dict[str, str]) -> list[tuple[str, str, str]]:
    """(module, the other archtune module, private name) for each `_name` a module of `sources`
    ({dotted module name: source}) takes from another: `from m import _name`, or `m._name` on an
    imported archtune module `m`."""
    found = []
    for here, source in sources.items():
        tree = ast.parse(source)
        modules: dict[str, str] = {}  # local name -> the archtune module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("archtune"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in sources:
                        modules[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif _private(a.name) and node.module != here:
                        found.append((here, node.module, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in sources:
                        modules[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and _private(node.attr) and modules[node.value.id] != here:
                found.append((here, modules[node.value.id], node.attr))
    return sorted(set(found))


def test_the_private_name_check_sees_both_spellings():
    # The control: both spellings are found; a module's own private names and public ones are not.
    sources = {"archtune.data.formats": "def _messages(): pass\n_messages()\n",
               "archtune.data.readers": "def _read(): pass\ndef read(): pass\n",
               "archtune.data.pipeline": "from archtune.data import formats\nfrom archtune.data.readers import _read, read\n"
                                         "formats._messages()\n"}
    assert private_names_taken(sources) == [("archtune.data.pipeline", "archtune.data.formats", "_messages"),
                                            ("archtune.data.pipeline", "archtune.data.readers", "_read")]


def test_no_module_takes_a_private_name_of_another():
    # A name another module needs is public: its module's interface, named without the underscore.
    sources = {_module_name(p): p.read_text() for p in SRC.rglob("*.py")}
    assert private_names_taken(sources) == []


def test_architecture_page_lists_the_flow():
    page = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    for group in FLOW[1:]:
        for name in group:
            if name != "__main__":
                assert f"`{name}/`" in page or f"`{name}.py`" in page, name


# ---------------------------------------------------------------- stages read the plan

# The stages after plan/ read the plan, not the raw config. The functions left reading it, each on purpose:
RAW_CONFIG_READERS = {
    # The plan's inputs: the model's config.json and tokenizer, read before there is a plan.
    ("models/load.py", "read_model_config"), ("models/load.py", "_config_json"), ("models/load.py", "resolve_plan"),
    ("models/load.py", "load_tokenizer"), ("models/load.py", "_tokenizer_class"),
    # The data cache key hashes the token-shaping keys as written (a new material would move every cache).
    ("data/cache.py", "config_material"),
    # run_record.json keeps the keys as the user gave them, beside the plan.
    ("train/lifecycle.py", "claim_output_dir"),
    # `check --memory`'s "would fit" suggestions resolve the config as written with one key changed.
    ("diagnostics/memory.py", "_with"),
}
STAGES = ("models", "patches", "adapters", "moe", "data", "train", "diagnostics", "export")


def raw_config_reads(source: str) -> list[tuple[str, str]]:
    """(function, attribute) for each attribute read from the raw config in `source`: `cfg.X` or
    `plan.config.X` (`config` alone is left out: in the stages it names a model's config)."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id == "cfg":
                found.append((func.name, node.attr))
            elif isinstance(value, ast.Attribute) and value.attr == "config" and isinstance(value.value, ast.Name) \
                    and value.value.id == "plan":
                found.append((func.name, node.attr))
    return found


def test_the_check_sees_raw_config_reads():
    # The control: each spelling is found, with the function it is in.
    source = "def f(cfg, plan, model):\n    return cfg.seed, plan.config.sequence_len, model.config.use_cache, plan.training.seed"
    assert raw_config_reads(source) == [("f", "seed"), ("f", "sequence_len")]


def test_the_stages_read_the_plan_not_the_raw_config():
    reads = sorted({(str(p.relative_to(SRC)), func, attr) for stage in STAGES for p in (SRC / stage).rglob("*.py")
                    for func, attr in raw_config_reads(p.read_text())
                    if (str(p.relative_to(SRC)), func) not in RAW_CONFIG_READERS})
    assert reads == []


# ---------------------------------------------------------------- plan/ reads what its rules decided

def keys_rules_set(sources: list[str]) -> set[str]:
    """The top-level config keys some rule decides: the first argument of `plan.set`/`plan.default`."""
    keys = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("set", "default") \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                keys.add(node.args[0].value.split(".")[0])
    return keys


def test_plan_reads_no_raw_key_a_rule_decides():
    # A rule reading the raw config of a key another rule decides sees the value as written, not the
    # decision (`bf16: auto` read as "auto", not as the bf16 the plan trains in).
    files = [*(SRC / "plan").rglob("*.py"), *(SRC / "families").rglob("*.py")]
    decided = keys_rules_set([p.read_text() for p in files])
    assert {"bf16", "lora_target_modules", "plugins"} <= decided  # the control: the walk finds the rules
    reads = sorted({(str(p.relative_to(SRC)), func, attr) for p in (SRC / "plan").rglob("*.py")
                    for func, attr in raw_config_reads(p.read_text()) if attr in decided})
    assert reads == []


# ---------------------------------------------------------------- stages read typed views, never a key by name

LOOKUPS = ("get", "decided", "section", "source", "user_set")


def plan_lookups(source: str) -> list[tuple[int, str]]:
    """(line, spelling) of each look-up of a plan setting by name: `plan.get(...)`, `self.plan.decided(...)`,
    and the aliases they hide behind (`d = plan.decided`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in LOOKUPS:
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "plan") or \
                    (isinstance(owner, ast.Attribute) and owner.attr == "plan"):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_lookup_check_sees_every_spelling():
    source = ("def f(plan, run, cfg):\n    d = plan.decided\n    return plan.get('adapter'), run.plan.section('fsdp_config'), "
              "d('seed'), cfg.get('x'), plan.adapter.kind\n")
    assert plan_lookups(source) == [(2, "plan.decided"), (3, "plan.get"), (3, "run.plan.section")]


def test_no_stage_looks_a_setting_up_by_name():
    # Outside plan/ every setting is read through a typed view (plan.model, plan.adapter, plan.training, ...).
    found = sorted(f"{p.relative_to(SRC)}:{line}: {spelling}" for p in SRC.rglob("*.py")
                   if p.relative_to(SRC).parts[0] != "plan" for line, spelling in plan_lookups(p.read_text()))
    assert found == []


def test_every_module_is_in_the_owner_table():
    doc = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    table = doc[doc.index("## Who owns what"):doc.index("## Rules that keep the shape")]
    missing = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
               if p.name != "__init__.py" and p.relative_to(SRC).parts[0] != "assets"
               and f"`{p.name}`" not in table]
    assert missing == [], f"docs/ARCHITECTURE.md's owner table does not name {missing}"
