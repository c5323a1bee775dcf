"""The ground floor: errors, argument checks, loading a model, tokens and probe prompts, hooks, reversible
edits and the per-family Q/K layout. Imports nothing from the other stages."""
