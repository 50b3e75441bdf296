"""structlog, configured once: JSON lines (console rendering on a terminal), with Celery's and
kombu's records going through the same ProcessorFormatter.

Inside a task, `task_id`, `task_name` and `root_id` are bound on `task_prerun` and cleared on
`task_postrun` (worker.app); steps bind `image_key` themselves.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from structlog.typing import Processor

SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(
    level: str | int = "INFO", log_format: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Route structlog and stdlib logging to stderr through one formatter."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if not use_console:
        final.append(structlog.processors.dict_tracebacks)
    final.append(renderer)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *SHARED,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED,
        processors=final,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in ("urllib3", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # oslo's format inspector logs every failed safety check; imgprep's ImageRefused carries the
    # reason and the step logs image_refused, so its own lines would only repeat it.
    logging.getLogger("oslo_utils.imageutils.format_inspector").setLevel(logging.CRITICAL)
