"""Pieces the stages share: config, records, tracking, storage, engines, model card."""

__version__ = "0.1.0"
