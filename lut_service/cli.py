"""Subcommands of this package (registered by effpose.cli)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``effpose`` parser."""
