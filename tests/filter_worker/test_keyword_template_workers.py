"""A keyword-template edit through the admin API reaches two real worker processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
from nats.aio.client import Client as NATS

from tests.admin_api.admin_api_helpers import API_KEY, AUTH, build_test_app, client_for
from tests.filter_worker.test_worker_processes import evaluate, headers, metric_sum
from tests.filters.filter_helpers import message
from tests.service_processes import ServiceProcess
from warden.policy.harms import SPAM_FRAUD
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.communities import create_community, update_community


async def test_an_edit_reaches_every_worker_within_a_second(
    spawn_service: Callable[..., ServiceProcess],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    name = f"tpl-{uuid.uuid4().hex[:8]}"
    community = f"c-{uuid.uuid4().hex[:8]}"
    await create_community(pg_pool, "test", community_id=community)
    await update_community(
        pg_pool,
        community,
        config={"keyword_template_filter_template_names": [name], "hellban_postfilter_minutes": 0},
    )
    app = build_test_app(API_KEY, pg_pool, nats_client)
    async with client_for(app, AUTH) as admin:
        r = await admin.post(f"/api/v1/keyword_templates/{name}", content="{# nothing yet #}")
        assert r.status_code == 200, r.text
        workers = [spawn_service("filter-worker") for _ in range(2)]
        for w in workers:
            await asyncio.to_thread(w.wait_ready)

        async def verdicts() -> list[Verdict]:
            return [
                Verdict.from_json(
                    await evaluate(
                        nats_client,
                        message(f"FREE crypto {i}"),
                        headers(f"${uuid.uuid4().hex}", community),
                    )
                )
                for i in range(8)
            ]

        # Both workers have the template compiled (and judge with it): neutral.
        assert all(v.content_class is ContentClass.NEUTRAL for v in await verdicts())

        template = (
            '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
            "org.matrix.msc4456.spam.fraud{% endif %}"
        )
        r = await admin.post(f"/api/v1/keyword_templates/{name}", content=template)
        assert r.status_code == 200, r.text
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while True:
            after = await verdicts()
            if all(
                v.content_class is ContentClass.PROHIBITED and v.harms == (SPAM_FRAUD,)
                for v in after
            ):
                break
            assert loop.time() < deadline, "template edit not seen by every worker within 1s"

    # Each worker reloaded the template on the notification (not by chance or timer).
    for w in workers:
        assert metric_sum([w], "warden_keyword_template_reloads_total", 'trigger="notification"')
        assert w.stop() == 0
