"""ruyi-pipeline data contracts: Great Expectations suites for every dataset and the model quality gates.

Modules:
    suites      the dataset contracts (`CONTRACTS`) and `build_suite(...)`: schema, types, nulls,
                lengths, duplicates, allowed characters, answer format, train/eval overlap, secrets
                and personal data, as code (the versioned source of truth).
    gates       the model quality gates: `gates_frame(...)` (one row per exit from the metrics files)
                and `gates_suite(...)`.
    context     `ContractContext`: a file-mode GX project with its Data Docs (`reports/contracts/` for
                the data, `reports/gates/` for the gates),
                and `SuiteResult` / `ExpectationFailure`, the plain-Python view of a validation.

Importing a submodule imports Great Expectations (~2.5 s): `tasks/` modules import them lazily.
GX's usage statistics are switched off here, before anything imports GX, and its INFO logs muted.
"""

import logging
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# GX logs its own bookkeeping (datasource saves, docs registration) at INFO; keep stage logs readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
