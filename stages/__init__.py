"""Stage functions shipped with the orchestrator (the default pipeline's)."""
