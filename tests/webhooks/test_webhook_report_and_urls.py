"""The audit report's content and escaping, and which webhook URLs are allowed."""

from __future__ import annotations

import dataclasses
import html
import re

import pytest

from warden.policy.antispam_keys import antispam_verdict_key, event_id_of
from warden.policy.verdict import SENDER_UNVERIFIED, ContentClass, FilterOutcome, Verdict
from warden_webhooks.report import UNVERIFIED_NOTE, build_report, matrix_to
from warden_webhooks.target import NotAllowed, check_webhook_url, host_allowed

HOSTILE = '<script>alert("x")</script>&'


def hostile_verdict() -> Verdict:
    return Verdict(
        event_id="$ev<b>:evil.test",
        content_class=ContentClass.PROHIBITED,
        harms=("org.matrix.msc4387.spam",),
        filters=(
            FilterOutcome("keyword", ContentClass.PROHIBITED, ("org.matrix.msc4387.spam",)),
            FilterOutcome("ai", ContentClass.NEUTRAL, error=f"boom {HOSTILE}"),
        ),
        room_id="!room:hs.test",
        community_id="c1",
        sender=f"@{HOSTILE}:evil.test",
        event_type=f"m.room.message{HOSTILE}",
        origin="other.test",
        first_seen_ts=1_700_000_000_000,
        extra={"source": "sign", "body_excerpt": f"buy now {HOSTILE} <img src=x onerror=y>"},
    )


def test_report_names_everything_and_escapes_user_controlled_html() -> None:
    verdict = hostile_verdict()
    report = build_report(verdict, now_ms=1_700_000_100_000)
    assert set(report) == {"text", "html"}
    body = report["html"]
    # No markup from the event survives: only our own tags are present.
    tags = set(re.findall(r"</?([a-zA-Z]+)", body))
    assert tags <= {"p", "strong", "ul", "li", "code", "a", "details", "summary", "pre"}
    assert "<script" not in body and "<img" not in body and "<b>" not in body
    assert html.escape(verdict.sender) in body
    assert html.escape(verdict.event_type) in body
    assert html.escape(f"boom {HOSTILE}") in body
    # The excerpt only inside <details>, escaped; never in the plain text.
    details = re.search(r"<details>(.*)</details>", body, re.S)
    assert details is not None
    assert html.escape("<img src=x onerror=y>") in details.group(1)
    assert body.count("buy now") == 1 and "buy now" not in report["text"]
    for part in (verdict.event_id, verdict.room_id, "org.matrix.msc4387.spam", "other.test"):
        assert part in report["text"]
    assert "2023-11-14T22:13:20Z" in report["text"]  # first seen
    assert "keyword: prohibited (org.matrix.msc4387.spam)" in report["text"]
    assert matrix_to("!room:hs.test") in report["text"]


def test_report_does_not_name_an_unverified_sender_as_the_author() -> None:
    verdict = hostile_verdict()
    plain = build_report(verdict, now_ms=1)
    assert UNVERIFIED_NOTE not in plain["text"] and UNVERIFIED_NOTE not in plain["html"]
    unverified = dataclasses.replace(
        verdict,
        filters=(FilterOutcome(SENDER_UNVERIFIED, ContentClass.NEUTRAL), *verdict.filters),
    )
    report = build_report(unverified, now_ms=1)
    assert f"User: {verdict.sender} {UNVERIFIED_NOTE}" in report["text"]
    assert html.escape(UNVERIFIED_NOTE) in report["html"]


def test_matrix_to_links_encode_ids() -> None:
    assert matrix_to("!room:hs.test", "$ev/x:hs.test") == (
        "https://matrix.to/#/!room%3Ahs.test/%24ev%2Fx%3Ahs.test"
    )


def test_a_homeserver_spam_check_refusal_links_the_event_itself() -> None:
    key = antispam_verdict_key("c1", "$ev:hs.test")
    verdict = dataclasses.replace(hostile_verdict(), event_id=key, extra={"source": "antispam"})
    report = build_report(verdict, now_ms=1)
    assert matrix_to("!room:hs.test", "$ev:hs.test") in report["html"]
    assert "(antispam)" in report["text"]
    assert event_id_of("$plain:hs.test") == "$plain:hs.test"


def test_report_without_excerpt_has_no_details() -> None:
    verdict = Verdict(event_id="$e", content_class=ContentClass.PROHIBITED, harms=("h",))
    assert "<details>" not in build_report(verdict, now_ms=0)["html"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("element.ems.host", True),
        ("hooks.element.ems.host", True),
        ("HOOKS.Element.EMS.host.", True),
        ("evilelement.ems.host", False),
        ("element.ems.host.evil.test", False),
        ("ems.host", False),
        ("127.0.0.1", False),
    ],
)
def test_allowed_domains_match_host_or_subdomain(host: str, allowed: bool) -> None:
    assert host_allowed(host, ["element.ems.host"]) is allowed


def test_ip_hosts_must_be_listed_exactly() -> None:
    assert host_allowed("127.0.0.1", ["127.0.0.1"])
    assert not host_allowed("10.0.0.1", ["0.0.1"])


def test_check_webhook_url_keeps_path_and_query_and_host_header() -> None:
    target = check_webhook_url(
        "https://hooks.element.ems.host/webhook/abc%2Fdef?x=1", ["element.ems.host"]
    )
    assert target.host == "hooks.element.ems.host"
    assert target.port == 443
    assert target.target == "/webhook/abc%2Fdef?x=1"
    assert target.host_header == "hooks.element.ems.host"
    assert check_webhook_url("https://localhost:8443/h", ["localhost"]).host_header == (
        "localhost:8443"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://element.ems.host/h", "https"),
        ("https://user:pw@element.ems.host/h", "credentials"),
        ("https://elsewhere.test/h", "not in PS_ALLOWED_WEBHOOK_DOMAINS"),
        ("ftp://element.ems.host/h", "https"),
        ("not a url", "https"),
    ],
)
def test_check_webhook_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(NotAllowed, match=reason):
        check_webhook_url(url, ["element.ems.host"])


def test_report_marks_dry_run_outcomes_as_not_counted() -> None:
    verdict = dataclasses.replace(
        hostile_verdict(),
        filters=(
            FilterOutcome("keyword", ContentClass.PROHIBITED, ("org.matrix.msc4387.spam",)),
            FilterOutcome(
                "links", ContentClass.PROHIBITED, ("org.matrix.msc4387.spam",), dry_run=True
            ),
        ),
    )
    report = build_report(verdict, now_ms=1)
    assert "keyword: prohibited (org.matrix.msc4387.spam)\n" in report["text"]
    assert "links: prohibited (org.matrix.msc4387.spam) [dry run: not counted]" in report["text"]
    assert "[dry run: not counted]</li>" in report["html"]
