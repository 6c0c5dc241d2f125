"""``POST /api/auth/login``: email and password → operator JWT."""

from __future__ import annotations

from backend import store
from backend.api.base import ApiError, ApiHandler


class LoginHandler(ApiHandler):
    async def post(self) -> None:
        body = self.json_body()
        email = self.field_str(body, "email", max_chars=320)
        password = self.field_str(body, "password", max_chars=1024)
        assert email is not None and password is not None
        async with self.db.session() as session:
            user_id = await store.authenticate(session, email, password)
        if user_id is None:
            raise ApiError(401, "wrong email or password")
        self.write_json({"token": self.issue_operator_token(user_id), "user_id": user_id})
