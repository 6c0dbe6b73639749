"""Failed logins, throttled per account and per address, for every door that checks a password.

Gradio's login form and ``/v1``'s Basic and ``user:password`` Bearer checks refuse a wrong
password at once, so 200 guesses took 0.29 s. Here each failure is counted in a sliding window
per account and per address (`supportlm.serve.admission.RateLimit`); once either has used its
allowance, every attempt from there is refused without checking the password until the window
has passed, right password included, so guessing costs the attacker minutes, not milliseconds.
A correct login is not counted. Counting per account also slows a guesser who spreads over many
addresses; the price is that such a guesser can keep one account's owner out for a window.
"""

from __future__ import annotations

from supportlm.serve.admission import Busy, RateLimit

ACCOUNT_FAILURES = 5  # wrong passwords per account per window
ADDRESS_FAILURES = 10  # wrong passwords per address per window
WINDOW_S = 300.0


class LoginThrottle:
    """Counts failed logins; `check` raises `Busy` while an account or address is locked."""

    def __init__(
        self,
        account_failures: int = ACCOUNT_FAILURES,
        address_failures: int = ADDRESS_FAILURES,
        window_s: float = WINDOW_S,
    ) -> None:
        self.window_s = window_s
        self._accounts = RateLimit(account_failures, window_s)
        self._addresses = RateLimit(address_failures, window_s)

    def check(self, account: str | None, address: str | None) -> None:
        """Raise `Busy` when `account` or `address` used up its failures (counts nothing)."""
        for limit, key in ((self._accounts, account), (self._addresses, address)):
            if key is not None and limit.used_up(key):
                minutes = round(self.window_s / 60)
                raise Busy(f"Too many failed logins; try again in {minutes} minutes.")

    def failed(self, account: str | None, address: str | None) -> None:
        """Count one failed login of `account` from `address`."""
        for limit, key in ((self._accounts, account), (self._addresses, address)):
            if key is not None:
                limit.record(key)
