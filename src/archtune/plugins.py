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
call per plugin), and aliases of them (Axolotl's KernelsPlugin, with an info line saying so).
Any other import path is refused unless the config sets `allow_external_plugins: true`,
because importing a named module runs its code. `use_kernels: true` adds the kernels plugin
when the list lacks it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol, runtime_checkable

from archtune.errors import Problem, UserError

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


# ---- the kernels plugin ---------------------------------------------------------------------


def _setting(cfg_or_plan, key: str, default: Any = None) -> Any:
    """A setting from a Plan (its decision) or a Config-like object."""
    getter = getattr(cfg_or_plan, "get", None)
    if getter is not None and hasattr(cfg_or_plan, "settings"):
        return getter(key, default)
    return getattr(cfg_or_plan, key, default)


class KernelsPlugin(BasePlugin):
    """`use_kernels` + `use_scattermoe` -> `experts_implementation: scattermoe`.

    pre_model_load: registers `scattermoe` in transformers' experts registry; the Plan's
    `experts_implementation` decision comes from plan.resolve (filled in here only if missing).
    post_model_load: `model.set_experts_implementation("scattermoe")`.
    post_adapters: with PEFT expert LoRA, skips PEFT's per-forward parametrization check
    (archtune.patches.expert_lora); the LoRA product is fused into scattermoe either way.
    """

    name = "kernels"

    @staticmethod
    def wants_scattermoe(cfg) -> bool:
        return bool(getattr(cfg, "use_kernels", False)) and bool(getattr(cfg, "use_scattermoe", False))

    def pre_model_load(self, cfg, plan) -> None:
        import archtune.moe  # noqa: F401  (registers "scattermoe" in transformers' registry)

        if plan is None or not self.wants_scattermoe(getattr(plan, "config", cfg)):
            return
        key = "experts_implementation"
        # plan.resolve's `experts_implementation` rule normally decided already (or refused a
        # conflicting user value): only fill the decision in when it is missing.
        if plan.get(key) is None and not any(p.key == key for p in plan.errors):
            plan.set(key, "scattermoe", "auto",
                     "use_kernels + use_scattermoe: archtune's ScatterMoE experts (expert LoRA fused)")

    def _active(self, plan) -> bool:
        if plan is None:
            return False
        if _setting(plan, "experts_implementation") == "scattermoe":
            return True
        return self.wants_scattermoe(getattr(plan, "config", plan))

    def post_model_load(self, model, plan) -> None:
        if not self._active(plan):
            return
        from archtune.moe import EXPERTS_IMPLEMENTATION
        from archtune.moe.routing_stats import experts_modules

        if not experts_modules(model):
            logger.warning("use_scattermoe: the model has no experts modules; nothing to change")
            return
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        logger.info("kernels plugin: experts_implementation = scattermoe")

    def post_adapters(self, model, plan) -> None:
        if not self._active(plan):
            return
        from archtune.patches.expert_lora import has_expert_lora, skip_parametrization_check

        if has_expert_lora(model):
            n = skip_parametrization_check(model)
            logger.info("kernels plugin: expert LoRA fused into scattermoe (%d expert adapters)", n)


# ---- registry -------------------------------------------------------------------------------

_BUILTINS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}


def register_plugin(path: str, cls: type, *, aliases: tuple[str, ...] = ()) -> None:
    """Allow-list a built-in plugin under its import path (and aliases). Duplicates fail."""
    for key in (path, *aliases):
        if key in _BUILTINS or key in _ALIASES:
            raise KeyError(f"plugin {key!r} is already registered; built-ins are listed in src/archtune/plugins.py")
    missing = [h for h in HOOKS if not callable(getattr(cls, h, None))]
    if missing:
        raise TypeError(f"plugin {path!r} lacks hooks {missing}; subclass archtune.plugins.BasePlugin")
    _BUILTINS[path] = cls
    for alias in aliases:
        _ALIASES[alias] = path


def builtin_plugins() -> dict[str, type]:
    return dict(_BUILTINS)


def plugin_aliases() -> dict[str, str]:
    return dict(_ALIASES)


register_plugin(
    "archtune.plugins.KernelsPlugin", KernelsPlugin,
    aliases=("archtune.kernels", "kernels", "axolotl.integrations.kernels.KernelsPlugin"),
)


class ChunkedCrossEntropyPlugin(BasePlugin):
    """Stands in for other trainers' fused-loss plugins (Axolotl's Cut Cross Entropy and Liger):
    their loss is archtune's chunked cross-entropy, which the Plan turns on (`chunked_cross_entropy`,
    from `cut_cross_entropy` / `liger_fused_linear_cross_entropy`) and the recipe installs. The
    plugin itself changes nothing."""

    name = "chunked_cross_entropy"


def _register_fused_loss_aliases() -> None:
    from archtune.plan.rules import CUT_CROSS_ENTROPY_PLUGIN, LIGER_PLUGIN

    register_plugin("archtune.plugins.ChunkedCrossEntropyPlugin", ChunkedCrossEntropyPlugin,
                    aliases=(CUT_CROSS_ENTROPY_PLUGIN, LIGER_PLUGIN))


_register_fused_loss_aliases()


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
        if path in _ALIASES:
            target = _ALIASES[path]
            if not path.startswith("archtune.") and "." in path:  # another project's path: say what runs
                logger.info("plugins: %s is accepted as an alias of archtune's %s plugin (%s); "
                            "%s itself is not imported", path, _BUILTINS[target].name, target, path)
            path = target
        if path in _BUILTINS:
            if path not in seen:
                seen.add(path)
                plugins.append(_BUILTINS[path]())
            continue
        if not allow_external:
            problems.append(Problem(
                key,
                f"{path!r} is not one of archtune's plugins ({', '.join(sorted(_BUILTINS) + sorted(_ALIASES))}); "
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
    kernels_path = "archtune.plugins.KernelsPlugin"
    if getattr(cfg, "use_kernels", False) and kernels_path not in seen:
        logger.info("plugins: use_kernels: true adds archtune's kernels plugin")
        plugins.append(KernelsPlugin())
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
    "BasePlugin",
    "ChunkedCrossEntropyPlugin",
    "KernelsPlugin",
    "Plugin",
    "builtin_plugins",
    "load_plugins",
    "plugin_aliases",
    "register_plugin",
    "run_hook",
]
