"""training app (see DESIGN.md)."""
