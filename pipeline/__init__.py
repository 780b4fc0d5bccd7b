"""mm's engine: an importable library with no CLI code (see DESIGN.md)."""
