"""`python -m psamf`: the `psamf` CLI without the console script (how `tune` starts its workers)."""
from psamf.cli.main import app

if __name__ == "__main__":
    app(prog_name="psamf")
