#!/usr/bin/env python
"""Write the list of Axolotl's config key names (src/archtune/config/axolotl_schema_keys.json).

Reads Axolotl's pydantic models with Python's `ast`, so nothing of Axolotl is imported or run, from
a released wheel (`pip download axolotl==VERSION --no-deps`: the record names the version and the
wheel's sha256) or from a git checkout (the working tree is not needed: files are read with
`git show COMMIT:PATH`; the record names the commit). Only key NAMES are recorded, with the model
class each comes from:

- "config": the keys of `AxolotlInputConfig` (its own fields and those of every base model in
  src/axolotl/utils/schemas/), their aliases (`model_config` for overrides_of_model_config), and
  the keys Axolotl's plugins add (src/axolotl/integrations/*/args.py);
- "datasets": the keys of one `datasets` entry (SFT, pretraining, DPO, KTO, stepwise, synthetic);
- "fsdp_config": the keys of `fsdp_config` (Axolotl's current, unprefixed names);
- "special_tokens": the keys of `special_tokens`;
- "trl": the keys of the `trl:` block (GRPO); "export": the keys of the `export:` block.

Usage: python scripts/axolotl_schema_keys.py axolotl-0.21.0-py3-none-any.whl > src/archtune/config/axolotl_schema_keys.json
       python scripts/axolotl_schema_keys.py GIT_DIR [COMMIT] > src/archtune/config/axolotl_schema_keys.json
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# Paths inside the package (a git checkout has them under src/).
SCHEMAS = "axolotl/utils/schemas/"
INTEGRATIONS = "axolotl/integrations/"
ROOT_CLASS = "AxolotlInputConfig"
NESTED = {
    "datasets": ["SFTDataset", "PretrainingDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset",
                 "SyntheticDataset"],
    "fsdp_config": ["FSDPConfig"],
    "special_tokens": ["SpecialTokensConfig"],
    "trl": ["TRLConfig"],
    "export": ["ExportConfig"],
}


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def read_wheel(wheel: str) -> tuple[dict[str, str], dict[str, str]]:
    """The package's schema and integration files (path -> text), and where they came from."""
    with zipfile.ZipFile(wheel) as z:
        files = {n: z.read(n).decode("utf-8") for n in z.namelist()
                 if n.endswith(".py") and n.startswith((SCHEMAS, INTEGRATIONS))}
        metadata = next(z.read(n).decode("utf-8") for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    version = re.search(r"^Version: (\S+)$", metadata, re.M).group(1)
    digest = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
    return files, {"version": f"v{version}", "wheel": Path(wheel).name, "sha256": digest}


def read_git(git_dir: str, rev: str) -> tuple[dict[str, str], dict[str, str]]:
    commit = git(git_dir, "rev-parse", rev).strip()
    names = git(git_dir, "ls-tree", "-r", "--name-only", commit, f"src/{SCHEMAS}", f"src/{INTEGRATIONS}").split()
    files = {n.removeprefix("src/"): git(git_dir, "show", f"{commit}:{n}") for n in names if n.endswith(".py")}
    return files, {"version": git(git_dir, "describe", "--tags", commit).strip(), "commit": commit}


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


def _is_classvar(annotation: ast.expr) -> bool:
    """`X: ClassVar[...] = ...` is a class constant, not a field."""
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return getattr(target, "id", getattr(target, "attr", None)) == "ClassVar"


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
                if name.startswith("_") or name == "model_config" or _is_classvar(item.annotation):
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
    source = sys.argv[1]
    if source.endswith(".whl"):
        files, origin = read_wheel(source)
    else:
        files, origin = read_git(source, sys.argv[2] if len(sys.argv) > 2 else "HEAD")
    classes: dict[str, tuple[list[str], list[str]]] = {}
    plugin_keys: dict[str, str] = {}
    for path in sorted(files):
        if path.startswith(SCHEMAS):
            classes.update(classes_in(files[path]))
    for path in sorted(files):
        # A plugin's top-level keys: the model its get_input_args() names (in integrations/NAME/*.py).
        if not (path.startswith(INTEGRATIONS) and path.endswith("/args.py") and path.count("/") == 3):
            continue
        plugin = path.split("/")[2]
        named: set[str] = set()
        for other in files:
            if other.startswith(f"{INTEGRATIONS}{plugin}/") and other.count("/") == 3:
                named |= set(re.findall(r'"axolotl\.integrations\.[\w.]+\.(\w+)"', files[other]))
        plugin_classes = classes_in(files[path])
        for name in sorted(named & set(plugin_classes)):
            for f in all_fields(name, plugin_classes):
                plugin_keys.setdefault(f, plugin)

    config = {k: "schema" for k in all_fields(ROOT_CLASS, classes)}
    for k, plugin in sorted(plugin_keys.items()):
        config.setdefault(k, f"plugin:{plugin}")
    doc = {
        "source": "https://github.com/axolotl-ai-cloud/axolotl",
        **origin,
        "generated_by": "scripts/axolotl_schema_keys.py",
        "config": dict(sorted(config.items())),
    }
    for section, names in NESTED.items():
        keys: list[str] = []
        for n in names:
            if n in classes:  # a block an older release does not have yet
                keys += [f for f in all_fields(n, classes) if f not in keys]
        doc[section] = sorted(keys)
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
