"""Process entry points leave live objects to the OS at exit (psamf.resources.skip_final_gc_at_exit):
a pipeline task and a CLI command each freeze the heap in an atexit hook, so Python's last garbage
collection does not walk torch's and mlflow's objects once more (about a second per process)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Registered first, so it runs last (atexit is LIFO): it sees what the entry point's hook did.
PROBE = "import atexit, gc; atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"


def frozen_at_exit(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE + code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("frozen at exit:")]
    assert line, out.stdout + out.stderr
    return int(line[-1].split(":")[1])


def test_a_pipeline_task_freezes_the_heap_at_exit():
    code = ("from psamf.stages import task\n"
            "@task('probe')\n"
            "def probe():\n"
            "    return {'objects': list(range(1000))}\n"
            "probe()\n")
    assert frozen_at_exit(code) > 0


def test_a_cli_command_freezes_the_heap_at_exit():
    code = ("from psamf.cli.main import app\n"
            "try:\n"
            "    app(['config', '--profile', 'smoke'])\n"
            "except SystemExit:\n"
            "    pass\n")
    assert frozen_at_exit(code) > 0


def test_nothing_is_frozen_by_importing_psamf():
    """Only entry points opt in: a notebook that imports psamf keeps Python's usual shutdown."""
    assert frozen_at_exit("import psamf.stages, psamf.cli.main, psamf.training\n") == 0


def test_the_hook_is_registered_once_per_process():
    code = ("import atexit\n"
            "from psamf.resources import skip_final_gc_at_exit\n"
            "before = atexit._ncallbacks()\n"
            "for _ in range(3):\n"
            "    skip_final_gc_at_exit()\n"
            "assert atexit._ncallbacks() == before + 1, atexit._ncallbacks() - before\n")
    assert frozen_at_exit(code) > 0
