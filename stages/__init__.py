"""Thin Typer commands, one per stage: parse, load params, call `pipeline`."""
