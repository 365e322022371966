"""The command line: ``python -m gptlit <command>`` (main), a run's config (run_config), the sample command."""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {"cli_main": "gptlit.cli.main"})
