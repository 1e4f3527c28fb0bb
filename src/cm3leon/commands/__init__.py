"""Subcommands of the ``cm3leon`` CLI, one module per stage."""
