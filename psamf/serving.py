"""The name psamf.registry.serving had until the 2026-12 layout change. Pyfunc models logged
before it pickled their class as `psamf.serving.MultPyfunc` / `psamf.serving.PsamfPyfunc`, so
those names must keep resolving for registered versions to load. New code imports
psamf.registry.serving."""
from psamf.registry.serving import MultPyfunc, PsamfPyfunc  # noqa: F401  (pickled class paths)
