"""Per-key rate limits, with the `limits` library: one budget for requests that change something, a larger one for
reads (polling a job, its events and images), counted in this process or in Redis for several replicas."""

import logging
import math
import time

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from sd_server.errors import QuotaExceededError
from sd_server.security.keys import Principal

logger = logging.getLogger(__name__)


class RateLimiter:
    """SD_RATE_LIMIT for POST, PUT and DELETE and SD_READ_RATE_LIMIT for reads, per API key (per client address in
    open mode), over a moving window, in SD_RATE_LIMIT_STORAGE."""

    def __init__(self, change_limit: str | None, read_limit: str | None, storage_uri: str = "memory://") -> None:
        self.limits = {False: parse(change_limit) if change_limit else None, True: parse(read_limit) if read_limit else None}
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def hit(self, principal: Principal, client: str, read: bool) -> None:
        """Count one request against its budget; QuotaExceededError past it. A storage that does not answer lets
        the request through (logged): limits protect the service, they must not take it down."""
        limit = self.limits[read]
        if limit is None:
            return
        identity = ("read:" if read else "change:") + (principal.key_id or f"address:{client}")
        try:
            allowed = self._limiter.hit(limit, identity)
        except Exception as error:  # Redis away, say
            logger.warning("rate limit storage failed (%s); request let through", error)
            return
        if not allowed:
            raise QuotaExceededError(self._message(limit, read), self._retry_after_s(limit, identity))

    def _retry_after_s(self, limit: RateLimitItem, identity: str) -> int:
        reset_at = self._limiter.get_window_stats(limit, identity).reset_time
        return max(1, math.ceil(reset_at - time.time()))

    @staticmethod
    def _message(limit: RateLimitItem, read: bool) -> str:
        setting = "SD_READ_RATE_LIMIT" if read else "SD_RATE_LIMIT"
        return f"rate limit of {limit} {'reads' if read else 'changes'} exceeded ({setting}); retry later"
