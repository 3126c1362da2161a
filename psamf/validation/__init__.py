"""`psamf data validate`: great-expectations suites over the prepared dataset.

`validate(cfg, out_dir=None)` loads `<prepared_dir>/<corpus>` (InputError if missing or
unreadable) and writes `reports/validation/<corpus>/` by default: `data_docs/index.html`
(GX data docs) and `summary.json`. `validate_dataset(ds, cfg, out_dir)` does the same for an
in-memory PreparedDataset. Both return a ValidationResult (success, failures, summary_path).
Importing this package is cheap; great-expectations is imported on the first validation.
"""
from psamf.validation.runner import ValidationResult, default_out_dir, validate, validate_dataset

__all__ = ["ValidationResult", "default_out_dir", "validate", "validate_dataset"]
