"""ruyi-pipeline data contracts: Great Expectations suites for every dataset and the model quality gates.

    suites      the dataset contracts (`CONTRACTS`, `build_suite`, `build_frame`), as code
    gates       the model quality gates (`gates_frame`, `gates_suite`)
    vl          the image-text (VQA) contract (`ImageBounds`, `build_vl_frame`, `build_vl_suite`)
    context     `ContractContext` (a file-mode GX project with Data Docs), `SuiteResult`, `ExpectationFailure`
                and `quarantine_rows` (failures -> per-row reasons)
    overlap     the paragraph keys of the held-out checks (no GX import: prepare_data builds on it too)

Importing suites, gates, vl or context imports Great Expectations (~2.5 s): `tasks/` modules import them
lazily. GX's usage statistics are switched off here, before anything imports GX, and its INFO logs muted.
Choices: docs/choices.md#validate_data, #gates and #vision-language-family.
"""

import logging
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# GX logs its own bookkeeping (datasource saves, docs registration) at INFO; keep stage logs readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
