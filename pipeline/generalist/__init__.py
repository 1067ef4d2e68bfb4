"""Generalists: promptable segmenters that turn the specialist's prompts into masks (SAM, classical)."""
