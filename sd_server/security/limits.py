"""Per-key request rate limit, with the `limits` library."""

import math
import time

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from sd_server.errors import QuotaExceededError
from sd_server.security.keys import Principal


class RateLimiter:
    """SD_RATE_LIMIT requests per API key (per client address in open mode), over a moving window."""

    def __init__(self, rate_limit: str | None) -> None:
        self.limit = parse(rate_limit) if rate_limit else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, principal: Principal, client: str) -> None:
        """Count one request; raises QuotaExceededError past the limit."""
        if self.limit is None:
            return
        identity = principal.key_id or f"address:{client}"
        if not self._limiter.hit(self.limit, identity):
            reset_at = self._limiter.get_window_stats(self.limit, identity).reset_time
            retry_after = max(1, math.ceil(reset_at - time.time()))
            raise QuotaExceededError(f"rate limit of {self.limit} exceeded (SD_RATE_LIMIT); retry later", retry_after)
