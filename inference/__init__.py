"""inference app (see DESIGN.md)."""
