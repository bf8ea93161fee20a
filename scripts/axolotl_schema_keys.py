#!/usr/bin/env python
"""Write the list of Axolotl's config key names (src/archtune/config/axolotl_schema_keys.json).

Reads Axolotl's pydantic models from a git checkout (the working tree is not needed: files are
read with `git show COMMIT:PATH`) with Python's `ast`, so nothing of Axolotl is imported or run.
Only key NAMES are recorded, with the model class each comes from:

- "config": the keys of `AxolotlInputConfig` (its own fields and those of every base model in
  src/axolotl/utils/schemas/), their aliases (`model_config` for overrides_of_model_config), and
  the keys Axolotl's plugins add (src/axolotl/integrations/*/args.py);
- "datasets": the keys of one `datasets` entry (SFT, pretraining, DPO, KTO, stepwise, synthetic);
- "fsdp_config": the keys of `fsdp_config` (Axolotl's current, unprefixed names);
- "special_tokens": the keys of `special_tokens`.

Usage: python scripts/axolotl_schema_keys.py GIT_DIR [COMMIT] > src/archtune/config/axolotl_schema_keys.json
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

SCHEMAS = "src/axolotl/utils/schemas/"
INTEGRATIONS = "src/axolotl/integrations/"
ROOT_CLASS = "AxolotlInputConfig"
NESTED = {
    "datasets": ["SFTDataset", "PretrainingDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset",
                 "SyntheticDataset"],
    "fsdp_config": ["FSDPConfig"],
    "special_tokens": ["SpecialTokensConfig"],
}


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def _alias(value: ast.expr | None) -> list[str]:
    """Names a `Field(alias=...)` / `Field(validation_alias=AliasChoices(...))` also accepts."""
    if not isinstance(value, ast.Call):
        return []
    out: list[str] = []
    for kw in value.keywords:
        if kw.arg in ("alias", "validation_alias"):
            v = kw.value
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                out.append(v.value)
            elif isinstance(v, ast.Call):
                out += [a.value for a in v.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def classes_in(source: str) -> dict[str, tuple[list[str], list[str]]]:
    """class name -> (base class names, field names including aliases) for every class in `source`."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
        fields: list[str] = []
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                name = item.target.id
                if name.startswith("_") or name == "model_config":
                    continue
                for key in [name, *_alias(item.value)]:
                    if key not in fields:
                        fields.append(key)
        out[node.name] = (bases, fields)
    return out


def all_fields(name: str, classes: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    bases, fields = classes[name]
    out = list(fields)
    for base in bases:
        if base in classes:
            out += [f for f in all_fields(base, classes) if f not in out]
    return out


def main() -> None:
    git_dir = sys.argv[1]
    commit = git(git_dir, "rev-parse", sys.argv[2] if len(sys.argv) > 2 else "HEAD").strip()
    describe = git(git_dir, "describe", "--tags", commit).strip()
    files = git(git_dir, "ls-tree", "-r", "--name-only", commit, SCHEMAS, INTEGRATIONS).split()
    classes: dict[str, tuple[list[str], list[str]]] = {}
    plugin_keys: dict[str, str] = {}
    for path in files:
        if path.endswith(".py") and path.startswith(SCHEMAS):
            classes.update(classes_in(git(git_dir, "show", f"{commit}:{path}")))
    for path in files:
        # A plugin's top-level keys: the model its get_input_args() names (in integrations/NAME/*.py).
        if not (path.startswith(INTEGRATIONS) and path.endswith("/args.py") and path.count("/") == 4):
            continue
        plugin = path.split("/")[3]
        named: set[str] = set()
        for other in files:
            if other.startswith(f"{INTEGRATIONS}{plugin}/") and other.count("/") == 4 and other.endswith(".py"):
                text = git(git_dir, "show", f"{commit}:{other}")
                named |= set(re.findall(r'"axolotl\.integrations\.[\w.]+\.(\w+)"', text))
        plugin_classes = classes_in(git(git_dir, "show", f"{commit}:{path}"))
        for name in sorted(named & set(plugin_classes)):
            for f in all_fields(name, plugin_classes):
                plugin_keys.setdefault(f, plugin)

    config = {k: "schema" for k in all_fields(ROOT_CLASS, classes)}
    for k, plugin in sorted(plugin_keys.items()):
        config.setdefault(k, f"plugin:{plugin}")
    doc = {
        "source": "https://github.com/axolotl-ai-cloud/axolotl",
        "commit": commit,
        "version": describe,
        "generated_by": "scripts/axolotl_schema_keys.py",
        "config": dict(sorted(config.items())),
    }
    for section, names in NESTED.items():
        keys: list[str] = []
        for n in names:
            keys += [f for f in all_fields(n, classes) if f not in keys]
        doc[section] = sorted(keys)
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
