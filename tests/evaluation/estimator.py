"""The history estimator, as reqapi.py ships it: the evaluation imports it from reqapi so that it
scores exactly the code that serves (the algorithm and its constants: docs/history-estimator.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # the repository root: reqapi.py

from reqapi import (  # noqa: E402,F401
    DEFAULT_PARAMS, REASON_INSUFFICIENT, REASON_NO_HISTORY, REASON_PINNED, SOURCE_BLEND, SOURCE_HISTORY,
    SOURCE_RULES, Basis, DayUsage, Params, Recommendation, ResourceBasis, RuleAnswer, cpu_day_value, is_leak,
    main_container, recommend, usable_days, weighted_quantile)
