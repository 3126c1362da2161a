"""The `psamf` command line: `main` (one Typer command per stage) and its groups (`psa_mf`, `registry`, `pipeline`), `kfp` (run, compile, submit and schedule the KFP pipeline)."""
