"""Credentials never reach a response body or a log line of the backend (issue 16, item 6), in
whatever shape they arrive: a query value that is not UTF-8, a ``?`` percent-encoded into the
path, a token in a path segment or a query parameter's name.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from tornado.web import HTTPError

from replyx.logs import clip, http_error_text, redact_secrets, redact_uri
from tests.fix_apps import Api
from tests.fix_db import Tenant


def fragments(secret: str) -> list[str]:
    """Pieces of ``secret`` long enough to matter: any 12 characters in a row."""
    return [secret[i:i + 12] for i in range(0, len(secret) - 12, 4)]


def assert_nowhere(secret: str, texts: list[str]) -> None:
    for text in texts:
        for piece in fragments(secret):
            assert piece not in text, (piece, text[:300])


@pytest.mark.gen_test(timeout=60)
async def test_invalid_utf8_query_values_are_never_echoed(
    api: Api, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    cases = [
        ("POST", f"/api/site/dialogs/{dialog_id}/messages?site_token=", tenant.site_token),
        ("POST", "/api/site/dialogs?site_token=", tenant.site_token),
        ("POST", f"/api/widget/dialogs/{dialog_id}/messages?guest_token=", guest),
        ("POST", f"/api/widget/dialogs/{dialog_id}/typing?guest_token=", guest),
        ("GET", f"/api/dialogs/{dialog_id}/messages?token=", tenant.token),
        ("GET", "/api/dialogs?token=", tenant.token),
    ]
    for method, prefix, secret in cases:
        # The bad byte first, in the middle, last: Tornado quoted the first 40 bytes.
        for spoiled in ("%ff" + quote(secret), quote(secret[:10]) + "%ff" + quote(secret[10:]),
                        quote(secret) + "%ff"):
            caplog.clear()
            with caplog.at_level(logging.DEBUG):
                r = await api.request(method, prefix + spoiled,
                                      {"text": "x"} if method == "POST" else None)
            assert r.code == 400, (prefix, r.code, r.body)
            assert set(r.body) == {"error"} and "not valid UTF-8" in r.body["error"], r.body
            assert_nowhere(secret, [str(r.body), *(rec.getMessage() for rec in caplog.records)])


@pytest.mark.gen_test(timeout=60)
async def test_a_credential_hidden_in_the_path_is_not_logged(
    api: Api, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    token = quote(tenant.site_token)
    paths = [
        f"/api/site/dialogs/3%3Fsite_token%3D{token}/messages",
        f"/api/site/dialogs/3%3fsite_token%3d{token}",
        f"/api/dialogs/1%3Ftoken%3D{quote(tenant.token)}/messages",
        f"/api/site/dialogs/{token}/messages",
        f"/api/site/dialogs/%ff{token}/messages",
        f"/api/nowhere/{token}",
        f"/api/site/dialogs/1/messages?{token}=1",
    ]
    for path in paths:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            r = await api.request("POST", path, {"text": "x"})
        assert 400 <= r.code < 500, (path, r.code)
        texts = [str(r.body), *(rec.getMessage() for rec in caplog.records)]
        assert_nowhere(tenant.site_token, texts)
        assert_nowhere(tenant.token, texts)
        assert any("replyx.access" == rec.name for rec in caplog.records), path


def test_redaction_covers_every_shape() -> None:
    site = "rxs_" + "A1b2C3d4" * 5 + "xyz"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
    assert redact_uri(f"/ws/site/dialogs/3%3Fsite_token%3D{site}") == (
        "/ws/site/dialogs/3?site_token=…")
    assert redact_uri(f"/ws/site/dialogs/3%3Fsite_token%3D{site}&since=1?x=2") == (
        "/ws/site/dialogs/3?site_token=…&since=…&x=…")
    assert redact_uri(f"/a/{site}/b?{site}=1") == "/a/rxs_…/b?rxs_…=…"
    assert redact_uri(f"/a%23token%3D{jwt}") == "/a?token=…"
    assert redact_uri("/a%0d%0aFAKE LINE") == "/a\\r\\nFAKE LINE"
    assert len(redact_uri("/x" * 5000)) < 200
    assert redact_secrets(f"Invalid unicode in site_token: b'{site[:36]}\\xff'") == (
        "Invalid unicode in site_token: b'rxs_…\\xff'")
    assert site not in redact_secrets(f"Bearer {site}") and jwt[:20] not in redact_secrets(jwt)
    long_origin = "https://" + "a" * 7800 + ".example"
    assert len(clip(long_origin)) < 150 and clip(long_origin).endswith("(7816 chars)")
    # Tornado's own refusal names the parameter, never its value.
    error = HTTPError(400, "Invalid unicode in %s: %r", "site_token", site.encode()[:40])
    assert http_error_text(error) == "Invalid unicode in site_token: '…'"
    error = HTTPError(400, "Invalid unicode in %s: %r", f"{site}", b"\xff")
    assert site[4:16] not in http_error_text(error)
