"""Offline orchestration: builds operator stores and hosts the ``stride`` CLI."""
