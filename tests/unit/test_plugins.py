"""archtune.plugins: built-ins, the Axolotl KernelsPlugin alias, refusal of other import paths."""
from __future__ import annotations

import logging
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from archtune.errors import UserError
from archtune.moe.kernels_plugin import KernelsPlugin
from archtune.plugins import (
    BasePlugin,
    Plugin,
    load_plugins,
    register_plugin,
    run_hook,
)

AXOLOTL_KERNELS = "axolotl.integrations.kernels.KernelsPlugin"


def cfg(**keys):
    base = {"plugins": None, "use_kernels": False, "use_scattermoe": False}
    base.update(keys)
    return SimpleNamespace(**base)


@pytest.fixture
def external_module(tmp_path, monkeypatch):
    """A plugin module that records being imported (importing runs its code)."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "ext_plugin_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        class MyPlugin:
            name = "mine"
            def post_model_load(self, model, plan):
                model.touched = True
            def callbacks(self, plan):
                return ["cb"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ext_plugin_mod", raising=False)
    yield "ext_plugin_mod.MyPlugin", marker
    sys.modules.pop("ext_plugin_mod", None)


@pytest.mark.parametrize("entry", [AXOLOTL_KERNELS, "archtune.plugins.KernelsPlugin", "archtune.kernels", "kernels"])
def test_kernels_plugin_and_aliases(entry, caplog):
    with caplog.at_level(logging.INFO, logger="archtune.plugins"):
        plugins = load_plugins(cfg(plugins=[entry]))
    assert len(plugins) == 1 and isinstance(plugins[0], KernelsPlugin)
    assert isinstance(plugins[0], Plugin)
    if entry == AXOLOTL_KERNELS:
        assert "accepted as an alias of archtune's kernels plugin" in caplog.text
        assert "axolotl" not in sys.modules  # the alias never imports Axolotl
    else:
        assert "alias" not in caplog.text


def test_duplicates_collapse_and_use_kernels_adds_the_plugin():
    assert len(load_plugins(cfg(plugins=[AXOLOTL_KERNELS, "kernels"]))) == 1
    plugins = load_plugins(cfg(use_kernels=True))
    assert [type(p) for p in plugins] == [KernelsPlugin]
    assert load_plugins(cfg()) == []


def test_external_plugin_refused_without_opt_in_and_not_imported(external_module):
    path, marker = external_module
    with pytest.raises(UserError) as ei:
        load_plugins(cfg(plugins=[path]))
    (problem,) = ei.value.problems
    assert problem.key == "plugins"
    assert path in problem.message and "importing a module runs its code" in problem.message
    assert "allow_external_plugins: true" in problem.fix
    assert not marker.exists()


def test_external_plugin_loads_with_opt_in(external_module):
    path, marker = external_module
    plugins = load_plugins(cfg(plugins=[path], allow_external_plugins=True))
    assert marker.exists()
    (plugin,) = plugins
    model = SimpleNamespace()
    run_hook(plugins, "pre_model_load", cfg(), None)  # missing hooks do nothing
    run_hook(plugins, "post_model_load", model, None)
    assert model.touched
    assert run_hook(plugins, "callbacks", None) == ["cb"]


def test_problems_are_gathered_into_one_error():
    with pytest.raises(UserError) as ei:
        load_plugins(cfg(plugins=["axolotl.integrations.spectrum.SpectrumPlugin", "x.y.Z", ""]))
    assert [p.key for p in ei.value.problems] == ["plugins"] * 3


def test_external_import_failure_is_a_user_error():
    with pytest.raises(UserError, match="could not load plugin 'no_such_module_xyz.P'"):
        load_plugins(cfg(plugins=["no_such_module_xyz.P"], allow_external_plugins=True))


def test_registry_refuses_duplicates_and_incomplete_plugins():
    with pytest.raises(KeyError, match="src/archtune/plugins.py"):
        register_plugin("archtune.plugins.KernelsPlugin", KernelsPlugin)
    with pytest.raises(KeyError):
        register_plugin("somewhere.Other", KernelsPlugin, aliases=(AXOLOTL_KERNELS,))

    class Incomplete:
        name = "x"

    with pytest.raises(TypeError, match="BasePlugin"):
        register_plugin("somewhere.Incomplete", Incomplete)


def test_base_plugin_hooks_are_no_ops():
    p = BasePlugin()
    assert p.pre_model_load(None, None) is None and p.callbacks(None) == []


# ---- the kernels plugin on a real Plan and tiny model ------------------------------------------


def _plan(**keys):
    from archtune.config import config_from_dict
    from archtune.models.tiny import build_tiny_config
    from archtune.plan import resolve

    config = config_from_dict({"base_model": "tiny:gemma4-moe", "datasets": [{"path": "data.jsonl"}], **keys})
    return config, resolve(config, build_tiny_config("gemma4-moe").to_dict())


def test_kernels_plugin_decides_scattermoe_in_the_plan():
    config, plan = _plan(use_kernels=True, use_scattermoe=True, micro_batch_size=1, sequence_len=32)
    KernelsPlugin().pre_model_load(config, plan)
    # plan.resolve chose by the experts' shape: with 8 pairs per expert the tiny model's experts run
    # faster on grouped_mm, and the plugin follows the plan (it does not switch the model to scattermoe).
    assert plan.get("experts_implementation") == "grouped_mm"
    assert plan.source("experts_implementation") == "auto"
    assert not plan.errors
    assert not KernelsPlugin()._active(plan)

    config, plan = _plan(use_kernels=True, use_scattermoe=True, experts_implementation="grouped_mm")
    KernelsPlugin().pre_model_load(config, plan)  # refused by plan.resolve; the plugin adds nothing
    assert [p.key for p in plan.errors] == ["experts_implementation"]
    assert plan.get("experts_implementation") == "grouped_mm"

    config, plan = _plan(use_kernels=True, use_scattermoe=True)
    del plan.settings["experts_implementation"]  # a Plan without the rule's decision
    KernelsPlugin().pre_model_load(config, plan)
    assert plan.get("experts_implementation") == "scattermoe"

    config, plan = _plan(use_kernels=True)  # no use_scattermoe: nothing decided
    KernelsPlugin().pre_model_load(config, plan)
    assert plan.get("experts_implementation") is None


def test_kernels_plugin_sets_the_model_and_fuses_expert_lora():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    from archtune.models.tiny import build_tiny_model

    config, plan = _plan(use_kernels=True, use_scattermoe=True, experts_implementation="scattermoe")
    plugins = load_plugins(config)
    run_hook(plugins, "pre_model_load", config, plan)
    model, _ = build_tiny_model("gemma4-moe")
    run_hook(plugins, "post_model_load", model, plan)
    assert model.model.language_model.config._experts_implementation == "scattermoe"
    model = get_peft_model(model, LoraConfig(r=2, target_modules=[], lora_dropout=0.0,
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    run_hook(plugins, "post_adapters", model, plan)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 8 and all("_activate_lora" in vars(w) for w in wrappers)
    model.train()
    out = model(input_ids=torch.randint(10, 500, (1, 6)), labels=torch.randint(10, 500, (1, 6)), use_cache=False)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n and p.requires_grad)
