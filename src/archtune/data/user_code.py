"""Your own Python, named in the config by import path (`rewards.accuracy`: module.function), as
Axolotl names reward functions (`trl.reward_funcs`) and GRPO dataset transforms (`type:`).

The module is looked up in the config's directory first (the plan's `rl_user_code_dir`), then on
the usual import path (the working directory included). Importing runs the module's code: that is
the point of naming it. A module that is missing or fails to import, a missing function, or a name
that is not a function is one UserError naming the config key, never a traceback.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

from archtune.errors import UserError


def _forget_other_copy(module: str, search_dir: str) -> None:
    """A module of the same name imported earlier from elsewhere (another config's rewards.py) is
    dropped, so this config's own file is the one imported."""
    top = module.split(".")[0]
    here = Path(search_dir)
    if not ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()):
        return
    loaded = sys.modules.get(top)
    origin = getattr(loaded, "__file__", None)
    if loaded is not None and (origin is None or Path(origin).resolve().parent not in (here.resolve(),
                                                                                       (here / top).resolve())):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def _import(module: str, key: str, path: str, search_dir: str | None):
    # The config's directory stays on the import path for the run: your functions may import
    # their neighbours when called.
    if search_dir is not None:
        if search_dir not in sys.path:
            sys.path.insert(0, search_dir)
        _forget_other_copy(module, search_dir)
    where = f"in {search_dir} or on the import path" if search_dir else "on the import path"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.split(".")[0] != exc.name.split(".")[0] and exc.name != module:
            raise UserError.single(key, f"{path}: importing {module} failed: it imports {exc.name}, which is not "
                                   "installed", f"install {exc.name}, or remove that import") from None
        file = module.replace(".", "/") + ".py"
        raise UserError.single(key, f"{path}: no module {module} ({file} not found {where})",
                               f"put {file} beside the config, or fix the module name in `{key}`") from None
    except Exception as exc:  # the module's own code raised while importing
        raise UserError.single(key, f"{path}: importing {module} raised {type(exc).__name__}: {exc}",
                               f"fix {module}'s code (it runs when imported)") from None


def load_function(path: str, key: str, search_dir: str | None) -> Callable:
    """The function `path` (module.function) names; `key` is the config key that names it."""
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise UserError.single(key, f"{path!r} is not an import path module.function",
                               "write it as file_name.function_name (e.g. rewards.accuracy)")
    mod = _import(module, key, path, search_dir)
    if not hasattr(mod, name):
        public = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == mod.__name__)
        shown = Path(getattr(mod, "__file__", None) or module).name
        raise UserError.single(key, f"{path}: {shown} has no function {name}",
                               f"define {name} in {shown}" + (f" (it defines: {', '.join(public)})" if public else ""))
    fn = getattr(mod, name)
    if not callable(fn):
        raise UserError.single(key, f"{path} is a {type(fn).__name__}, not a function", f"make {name} a function")
    return fn


__all__ = ["load_function"]
