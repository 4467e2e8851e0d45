"""queen-rbee: the orchestrator (DESIGN 4.3 and 5)."""
