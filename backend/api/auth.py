"""``POST /api/auth/login``: email and password → operator JWT.

Failed logins are limited per client address (``REPLYX_LOGIN_MAX_FAILURES`` in
``REPLYX_LOGIN_WINDOW`` seconds). The count is kept in Postgres, where all four
workers see it; past the limit every attempt, right or wrong, gets 429 with
``Retry-After`` until the window ends.
"""

from __future__ import annotations

import math

from backend import store
from backend.api.base import ApiError, ApiHandler
from replyx.addresses import client_address, limit_key


class LoginHandler(ApiHandler):
    async def post(self) -> None:
        body = self.json_body()
        email = self.field_str(body, "email", max_chars=320)
        password = self.field_str(body, "password", max_chars=1024)
        assert email is not None and password is not None
        address = limit_key(client_address(self.request))
        config = self.config
        async with self.db.session() as session:
            wait = await store.reserve_login_attempt(
                session, address, config.login_max_failures, config.login_window
            )
            if wait is not None:
                seconds = str(math.ceil(wait))
                raise ApiError(
                    429, f"too many failed logins from this address; retry in {seconds} s",
                    {"Retry-After": seconds},
                )
            user_id = await store.authenticate(session, email, password)
            if user_id is not None:
                await store.release_login_attempt(session, address)
        if user_id is None:
            raise ApiError(401, "wrong email or password")
        self.write_json({"token": self.issue_operator_token(user_id), "user_id": user_id})
