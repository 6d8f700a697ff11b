"""The engine: a run from frozen plan to finished record (see ARCHITECTURE.md)."""
