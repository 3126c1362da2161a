"""Pages people read: `html` (shared page, table and figure helpers), `personalization` (the per-run report)."""
