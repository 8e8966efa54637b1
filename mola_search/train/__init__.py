"""Training and evaluation: batching (tokens), trainer (the loop), evaluate (scoring), run (one whole run)."""
