"""Graph rewrite passes."""
