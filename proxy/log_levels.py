"""Whether a logger logs a level, asked from compiled code without calling into interpreted code.

``logging.Logger.isEnabledFor`` is a Python method: every login asks it (its "login ok" and "client gone"
lines are INFO, usually off), and measured under ``pgbench -C`` the call costs compiled code over a
microsecond each time, cold as it is between logins. Compiled, this is two dict lookups.
"""

from __future__ import annotations

import logging


def enabled_for(logger: logging.Logger, level: int) -> bool:
    """``logger.isEnabledFor(level)``, answered from the logger's own cache when it has the answer.

    logging clears that cache whenever a level changes anywhere (``Manager._clear_cache``), so it is
    never stale; on a miss, ``isEnabledFor`` itself answers and fills it.
    """
    attributes = logger.__dict__  # one attribute lookup, then dict lookups (both are instance attributes)
    if attributes.get("disabled"):
        return False
    cache: dict[int, bool] | None = attributes.get("_cache")
    if cache is not None:
        answer = cache.get(level)
        if answer is not None:
            return answer
    return logger.isEnabledFor(level)
