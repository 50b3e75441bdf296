"""imgprep's errors under their wire name: stored failures name `tasks.errors` as their
`exc_module` (README, "Wire contract"); the errors themselves are domain.core.errors.

imgprep's result backend (worker.app.results) writes and reads that name itself. This alias is for
Python clients on Celery's own result backend, which look the class up in
`sys.modules[exc_module]`: having imported `tasks.errors`, they rebuild a stored failure as the
same class, as before the errors moved.
"""

from __future__ import annotations

from domain.core.errors import *  # noqa: F403 - every error, under its published module name
