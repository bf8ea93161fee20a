"""archtune's command line: the typer commands (commands.py) and the rendering of a plan (check.py).

The console script `archtune` runs `archtune.cli:main`.
"""
from archtune.cli import threads  # noqa: F401  first: its load probe starts before the heavy imports
from archtune.cli.commands import app, generate_text, main

__all__ = ["app", "generate_text", "main"]
