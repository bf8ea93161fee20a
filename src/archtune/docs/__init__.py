"""`archtune docs`: docs/model_architectures.md rendered from the family registry and the rules
(model_architectures.py), with the scenarios it resolves (scenarios.py) and its Markdown/YAML
formatting (markdown.py)."""
from archtune.docs.markdown import yaml_block
from archtune.docs.model_architectures import (DOCS_FILE, HEADER, default_output, docs_diff,
                                               render_model_architectures, write_docs)

__all__ = ["DOCS_FILE", "HEADER", "default_output", "docs_diff", "render_model_architectures", "write_docs",
           "yaml_block"]
