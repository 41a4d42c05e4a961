"""CLI commands (placeholder until its issue lands)."""

from wbc.cli.app import app  # noqa: F401
