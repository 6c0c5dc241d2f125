"""Prometheus metrics of the backend (summed over its workers) and the gateway, on the shared
production-like stack (``ops`` in tests/fix_stack.py)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import Stack
from tests.net import get_text


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.mark.gen_test(timeout=90)
async def test_backend_metrics_count_requests_of_all_four_workers(
    ops: Stack, tenant: Tenant
) -> None:
    key = ("replyx_backend_requests_total",
           (("code", "401"), ("method", "GET"), ("route", "/api/dialogs")))
    duration = ("replyx_backend_request_duration_seconds_count",
                (("method", "GET"), ("route", "/api/dialogs")))
    # The stack is shared with other modules: compare before and after, never totals.
    _, before_text = await get_text(ops.api + "/metrics")
    before = metrics(before_text)

    # A new connection per request, so gunicorn spreads them over its workers.
    http = AsyncHTTPClient(force_instance=True, max_clients=20)

    async def one() -> str:
        response = await http.fetch(HTTPRequest(
            ops.api + "/api/dialogs", headers={"Connection": "close"}), raise_error=False)
        assert response.code == 401
        return response.headers["X-Replyx-Worker"]

    workers: Counter[str] = Counter()
    for _ in range(10):  # until at least two workers answered (the kernel picks who accepts)
        workers.update(await asyncio.gather(*(one() for _ in range(20))))
        if len(workers) >= 2:
            break
    http.close()
    sent = sum(workers.values())
    assert len(workers) >= 2, workers

    # Whichever worker answers /metrics, it reports the sum over all of them.
    for _ in range(3):
        code, text = await get_text(ops.api + "/metrics")
        assert code == 200
        samples = metrics(text)
        assert samples[key] - before.get(key, 0.0) == sent
        assert samples[("replyx_backend_workers", ())] == 4
    # (Checked: with the backend locally observing each duration twice, this fails; the
    # old `>= sent` passed.)
    assert samples[duration] - before.get(duration, 0.0) == sent

    # Same rule as the gateway: through a proxy, only with an operator token.
    proxied = {"X-Forwarded-For": "203.0.113.9"}
    assert (await get_text(ops.api + "/metrics", **proxied))[0] == 401
    code, _ = await get_text(ops.api + "/metrics", Authorization=f"Bearer {tenant.token}",
                               **proxied)
    assert code == 200
    # nginx does not expose /metrics at all.
    assert (await get_text(ops.nginx + "/metrics"))[0] == 404


GATEWAY_FAMILIES = {
    "replyx_sockets": "gauge",
    "replyx_listener_up": "gauge",
    "replyx_dialogs_watched": "gauge",
    "replyx_notification_queue_length": "gauge",
    "replyx_resyncing_dialogs": "gauge",
    "replyx_frames_sent": "counter",
    "replyx_frames_replayed": "counter",
    "replyx_messages_routed": "counter",
    "replyx_notifications": "counter",
    "replyx_bad_notifications": "counter",
    "replyx_slow_consumers_dropped": "counter",
    "replyx_listener_reconnects": "counter",
    "replyx_refused_handshakes": "counter",
    "replyx_notification_lag_seconds": "histogram",
    "replyx_gateway_message_stage_seconds": "histogram",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}
BACKEND_FAMILIES = {
    "replyx_backend_requests": "counter",
    "replyx_backend_request_duration_seconds": "histogram",
    "replyx_backend_message_stage_seconds": "histogram",
    "replyx_backend_commit_writes": "histogram",
    "replyx_backend_workers": "gauge",
}
COMMITS = (("replyx_backend_commit_writes_count", ()), ("replyx_backend_commit_writes_sum", ()))


@pytest.mark.gen_test(timeout=60)
async def test_metric_names_follow_prometheus_conventions(ops: Stack, tenant: Tenant) -> None:
    api, sockets = Api(ops.api), Sockets(ops.ws)
    # The stack is shared with other modules: counters are compared before and after.
    # (Checked: with the gateway locally counting each routed message and each refusal
    # twice, this fails; the old `>= 1` passed.)
    before = metrics((await get_text(ops.gateway + "/metrics"))[1])
    before_backend = metrics((await get_text(ops.api + "/metrics"))[1])
    dialog_id = await api.site_dialog(tenant)
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    assert await sockets.refused(sockets.admin_url(tenant, 999999999)) == 4004
    await api.post_site(tenant, dialog_id, "measured")
    await site.wait_for_seq(1)
    # One message, alone: one commit holding one write, whichever worker took it.
    after_backend = metrics((await get_text(ops.api + "/metrics"))[1])
    assert [after_backend[k] - before_backend.get(k, 0.0) for k in COMMITS] == [1.0, 1.0]

    for url, expected in ((ops.gateway + "/metrics", GATEWAY_FAMILIES),
                          (ops.api + "/metrics", BACKEND_FAMILIES)):
        code, text = await get_text(url)
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, kind in expected.items():
            assert name in families, (url, name)
            assert families[name].type == kind, (name, families[name].type)
        for family in families.values():
            if family.name.endswith("_created"):
                continue  # prometheus-client's creation timestamps of counters and histograms
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
            assert family.documentation, family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
            assert not family.name.endswith("_total")
            if "lag" in family.name or "duration" in family.name:
                assert family.name.endswith("_seconds"), family.name
    samples = metrics((await get_text(ops.gateway + "/metrics"))[1])
    # Every refusal code is there from the start (0 until it happens), so rate() works.
    for code_ in ("4001", "4003", "4004"):
        assert ("replyx_refused_handshakes_total", (("code", code_),)) in samples
    refused = ("replyx_refused_handshakes_total", (("code", "4004"),))
    assert samples[refused] - before[refused] == 1
    assert samples[("replyx_sockets", (("kind", "site"),))] == 1
    assert samples[("replyx_listener_up", ())] == 1
    routed = ("replyx_messages_routed_total", ())
    assert samples[routed] - before[routed] == 1
    await sockets.close_all()


@pytest.mark.gen_test(timeout=60)
async def test_every_message_is_timed_stage_by_stage(ops: Stack, tenant: Tenant) -> None:
    """Each posted message is counted once in every stage of the backend and the gateway
    (replyx/timing.py), so ``replyx bench`` can say which stage a regression is in."""
    api, sockets = Api(ops.api), Sockets(ops.ws)
    dialog_id = await api.site_dialog(tenant)
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    urls = {"gateway": ops.gateway + "/metrics", "backend": ops.api + "/metrics"}
    before = {name: metrics((await get_text(url))[1]) for name, url in urls.items()}
    for n in range(3):
        await api.post_site(tenant, dialog_id, f"timed {n}")
    await site.wait_for_seq(3)
    await asyncio.sleep(0.2)  # the consumer times a batch right after writing it
    stages = {"backend": ("handler", "commit"),
              "gateway": ("notify", "queue", "parse", "deliver")}
    for name, url in urls.items():
        after = metrics((await get_text(url))[1])
        for stage in stages[name]:
            labels = (("stage", stage),)
            count = (f"replyx_{name}_message_stage_seconds_count", labels)
            total = (f"replyx_{name}_message_stage_seconds_sum", labels)
            assert after[count] - before[name].get(count, 0.0) == 3, (name, stage)
            assert after[total] >= before[name].get(total, 0.0), (name, stage)
        # Posting and routing take time: the main stages cannot all be zero.
        main = "commit" if name == "backend" else "deliver"
        total = (f"replyx_{name}_message_stage_seconds_sum", (("stage", main),))
        assert after[total] > before[name].get(total, 0.0)
    await sockets.close_all()
