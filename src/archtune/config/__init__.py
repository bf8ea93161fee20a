"""Config: the pydantic schema (Axolotl key names) and the loader with clear errors."""
from archtune.config.load import config_from_dict, config_to_dict, flatten, load_config, parse_override
from archtune.config.schema import Config, DatasetConfig, WeightScaleRule

__all__ = [
    "Config",
    "DatasetConfig",
    "WeightScaleRule",
    "load_config",
    "config_from_dict",
    "parse_override",
    "config_to_dict",
    "flatten",
]
