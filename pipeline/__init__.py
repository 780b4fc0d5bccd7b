"""mm's engine: an importable library with no CLI code (see docs/design.md)."""
