"""The data pipeline: sources -> readers -> format -> tokenize + mask -> validate -> split ->
pack -> cache (pipeline.py runs it: `prepare_data(plan, tokenizer)`, reading `plan.data`)."""
from archtune.data.collate import DataCollator
from archtune.data.formats import render_prompt
from archtune.data.row_errors import DROP_REASONS
from archtune.data.pipeline import STATS_KEYS, MediaSetup, PreparedData, prepare_data
from archtune.data.sources import resolve_source
from archtune.data.tokenize import IGNORE_INDEX, encode_prompt

__all__ = ["PreparedData", "MediaSetup", "prepare_data", "render_prompt", "encode_prompt", "DataCollator",
           "IGNORE_INDEX", "DROP_REASONS", "STATS_KEYS", "resolve_source"]
