"""Plugins: `plugins:` entries with a small protocol of hooks around the training recipe.

    plugins:
      - axolotl.integrations.kernels.KernelsPlugin    # accepted: alias of archtune's kernels plugin
    use_kernels: true
    use_scattermoe: true

Hooks, called by the recipe in this order (each optional; the defaults do nothing):
    pre_model_load(cfg, plan)      before weights load (may add Plan decisions)
    post_model_load(model, plan)   after the model is built
    post_adapters(model, plan)     after PEFT adapters are added
    callbacks(plan) -> list        extra Trainer callbacks

Which entries load: archtune's built-ins (the registry below, filled by one `register_plugin`
call per plugin; the kernels plugin lives in archtune/moe/kernels_plugin.py), and aliases of them (Axolotl's KernelsPlugin, with an info line saying so).
Any other import path is refused unless the config sets `allow_external_plugins: true`,
because importing a named module runs its code. `use_kernels: true` adds the kernels plugin
when the list lacks it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol, runtime_checkable

from archtune.errors import Problem, UserError
from archtune.registry import Registry

logger = logging.getLogger(__name__)

HOOKS = ("pre_model_load", "post_model_load", "post_adapters", "callbacks")


@runtime_checkable
class Plugin(Protocol):
    name: str

    def pre_model_load(self, cfg, plan) -> None: ...

    def post_model_load(self, model, plan) -> None: ...

    def post_adapters(self, model, plan) -> None: ...

    def callbacks(self, plan) -> list: ...


class BasePlugin:
    """No-op hooks; built-in plugins subclass it and override what they need."""

    name = "base"

    def pre_model_load(self, cfg, plan) -> None:
        return None

    def post_model_load(self, model, plan) -> None:
        return None

    def post_adapters(self, model, plan) -> None:
        return None

    def callbacks(self, plan) -> list:
        return []


# ---- registry -------------------------------------------------------------------------------
# Built-ins are registered by name with where their class lives ("module:Class"), imported only
# when a config uses them: the plan checks names against this registry without importing them.

PLUGINS: Registry[str | type] = Registry("plugin", "src/archtune/plugins.py")
ALIASES: Registry[str] = Registry("plugin alias", "src/archtune/plugins.py")
KERNELS = "archtune.plugins.KernelsPlugin"


def _check_hooks(path: str, cls: type) -> type:
    missing = [h for h in HOOKS if not callable(getattr(cls, h, None))]
    if missing:
        raise TypeError(f"plugin {path!r} lacks hooks {missing}; subclass archtune.plugins.BasePlugin")
    return cls


def register_plugin(path: str, cls: str | type, *, aliases: tuple[str, ...] = ()) -> None:
    """Allow-list a built-in plugin under its name (and aliases). `cls` is the class, or
    "module:Class" to import it only when a config uses it. A name registered twice is a KeyError."""
    for name in (path, *aliases):
        if name in PLUGINS or name in ALIASES:
            raise KeyError(f"plugin {name!r} is already registered; built-ins are listed in src/archtune/plugins.py")
    if isinstance(cls, type):
        _check_hooks(path, cls)
    PLUGINS.register(path, cls)
    for alias in aliases:
        ALIASES.register(alias, path)


def builtin_plugins() -> dict[str, str | type]:
    return dict(PLUGINS.items())


def plugin_aliases() -> dict[str, str]:
    return dict(ALIASES.items())


def builtin_class(path: str) -> type:
    """The class of built-in plugin `path` (imported now when registered as "module:Class")."""
    cls = PLUGINS[path]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = _check_hooks(path, getattr(importlib.import_module(module), attr))
    return cls


register_plugin(KERNELS, "archtune.moe.kernels_plugin:KernelsPlugin",
                aliases=("archtune.kernels", "kernels", "axolotl.integrations.kernels.KernelsPlugin"))


class ChunkedCrossEntropyPlugin(BasePlugin):
    """Stands in for other trainers' fused-loss plugins (Axolotl's Cut Cross Entropy and Liger):
    their loss is archtune's chunked cross-entropy, which the Plan turns on (`chunked_cross_entropy`,
    from `cut_cross_entropy` / `liger_fused_linear_cross_entropy`) and the recipe installs. The
    plugin itself changes nothing."""

    name = "chunked_cross_entropy"


# Plugin paths of other trainers' fused losses; listing one asks for the chunked loss (Axolotl's Cut
# Cross Entropy plugin turns its loss on by itself; Liger's needs liger_fused_linear_cross_entropy).
CUT_CROSS_ENTROPY_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"

register_plugin("archtune.plugins.ChunkedCrossEntropyPlugin", ChunkedCrossEntropyPlugin,
                aliases=(CUT_CROSS_ENTROPY_PLUGIN, LIGER_PLUGIN))


class _Adapter(BasePlugin):
    """An external plugin object with some hooks missing: the missing ones do nothing."""

    def __init__(self, inner: Any, name: str) -> None:
        self.inner, self.name = inner, name
        for hook in HOOKS:
            if callable(getattr(inner, hook, None)):
                setattr(self, hook, getattr(inner, hook))


def _import_external(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted import path (module.Class)")
    module = importlib.import_module(module_name)
    obj = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj


def load_plugins(cfg) -> list[Plugin]:
    """The plugins `cfg.plugins` names (plus the kernels plugin when use_kernels is set).

    Raises UserError (key "plugins", every problem gathered) for entries that are neither
    built-in nor allowed by `allow_external_plugins: true`, and for external ones that fail to import.
    """
    entries = list(getattr(cfg, "plugins", None) or [])
    allow_external = bool(getattr(cfg, "allow_external_plugins", False))
    problems: list[Problem] = []
    plugins: list[Plugin] = []
    seen: set[str] = set()
    key = "plugins"
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            problems.append(Problem(key, f"{entry!r} is not an import path", "give module.Class"))
            continue
        path = entry.strip()
        if path in ALIASES:
            target = ALIASES[path]
            if not path.startswith("archtune.") and "." in path:  # another project's path: say what runs
                logger.info("plugins: %s is accepted as an alias of archtune's %s plugin (%s); "
                            "%s itself is not imported", path, builtin_class(target).name, target, path)
            path = target
        if path in PLUGINS:
            if path not in seen:
                seen.add(path)
                plugins.append(builtin_class(path)())
            continue
        if not allow_external:
            problems.append(Problem(
                key,
                f"{path!r} is not one of archtune's plugins ({', '.join(sorted(PLUGINS) + sorted(ALIASES))}); "
                "external plugins are refused by default because importing a module runs its code",
                "remove the entry, or set allow_external_plugins: true if you trust that module"))
            continue
        try:
            obj = _import_external(path)
        except Exception as e:  # ImportError, AttributeError, or the plugin's own constructor
            problems.append(Problem(key, f"could not load plugin {path!r}: {type(e).__name__}: {e}",
                                    "check the import path and that its package is installed"))
            continue
        if not any(callable(getattr(obj, h, None)) for h in HOOKS):
            problems.append(Problem(key, f"{path!r} has none of the plugin hooks {list(HOOKS)}",
                                    "implement archtune.plugins.Plugin (subclass BasePlugin)"))
            continue
        logger.info("plugins: loaded external plugin %s (allow_external_plugins: true)", path)
        plugins.append(obj if all(callable(getattr(obj, h, None)) for h in HOOKS) else _Adapter(obj, path))
    if problems:
        raise UserError(problems)
    if getattr(cfg, "use_kernels", False) and KERNELS not in seen:
        logger.info("plugins: use_kernels: true adds archtune's kernels plugin")
        plugins.append(builtin_class(KERNELS)())
    return plugins


def run_hook(plugins: list[Plugin], hook: str, *args) -> list:
    """Call `hook` on every plugin in order; for `callbacks`, the concatenated lists."""
    if hook not in HOOKS:
        raise KeyError(f"unknown plugin hook {hook!r}; hooks: {HOOKS}")
    results: list = []
    for plugin in plugins:
        out = getattr(plugin, hook)(*args)
        if hook == "callbacks" and out:
            results.extend(out)
    return results


__all__ = [
    "HOOKS",
    "ALIASES",
    "BasePlugin",
    "ChunkedCrossEntropyPlugin",
    "CUT_CROSS_ENTROPY_PLUGIN",
    "LIGER_PLUGIN",
    "PLUGINS",
    "Plugin",
    "builtin_class",
    "builtin_plugins",
    "load_plugins",
    "plugin_aliases",
    "register_plugin",
    "run_hook",
]
