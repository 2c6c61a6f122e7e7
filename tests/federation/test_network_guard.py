"""The SSRF guard: the rules themselves, and that they hold where connections are made."""

from __future__ import annotations

import ipaddress
import ssl

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.federation.conftest import DENIED_TEST_NETWORK, random_loopback_ip
from warden.federation.client import FederationClient
from warden.federation.errors import DeniedDestination, PermanentFederationError
from warden.federation.network_guard import GuardedTransport, NetworkGuard
from warden.settings import SettingsError, load_settings

DEFAULT = NetworkGuard.from_settings(load_settings())


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        # IPv4 in IPv6 disguises of denied IPv4 addresses:
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    ],
)
def test_default_settings_deny_internal_addresses(ip: str) -> None:
    assert not DEFAULT.is_allowed(ip)
    with pytest.raises(DeniedDestination) as info:
        DEFAULT.check(ip, destination="evil.example")
    assert info.value.address == ip
    assert info.value.destination == "evil.example"
    assert "evil.example" in str(info.value)
    assert isinstance(info.value, PermanentFederationError)


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "2002:808:808::"]
)
def test_default_settings_allow_public_addresses_of_both_families(ip: str) -> None:
    assert DEFAULT.is_allowed(ip)
    DEFAULT.check(ip)


def test_deny_wins_over_allow() -> None:
    guard = NetworkGuard(["127.0.0.0/8"], ["127.0.0.1/32"])
    assert not guard.is_allowed("127.0.0.1")
    assert guard.is_allowed("127.0.0.2")


def test_addresses_outside_the_allow_list_are_denied() -> None:
    guard = NetworkGuard(["203.0.113.0/24"], [])
    assert guard.is_allowed("203.0.113.7")
    assert not guard.is_allowed("198.51.100.7")
    assert not guard.is_allowed("2001:4860::1")


def test_ipv4_only_allow_list_judges_mapped_addresses_as_ipv4() -> None:
    guard = NetworkGuard(["0.0.0.0/0"], ["127.0.0.0/8"])
    assert guard.is_allowed("::ffff:8.8.8.8")
    assert not guard.is_allowed("::ffff:127.0.0.1")
    assert not guard.is_allowed("2001:4860::8888")  # no IPv6 allowed


def test_removing_loopback_from_the_deny_list_allows_it() -> None:
    settings = load_settings(
        homeserver_denied_networks="10.0.0.0/8",
    )
    guard = NetworkGuard.from_settings(settings)
    assert guard.is_allowed("127.0.0.1")
    assert guard.is_allowed("::ffff:127.0.0.1")
    assert not guard.is_allowed("::ffff:10.0.0.1")


def test_non_addresses_are_refused() -> None:
    with pytest.raises(DeniedDestination, match="not an IP address"):
        DEFAULT.check("localhost")
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        DEFAULT.is_allowed("example.org")


def test_a_bad_cidr_stops_the_service_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_HOMESERVER_DENIED_NETWORKS", "10.0.0.0/8,192.168.0.0/33")
    with pytest.raises(SettingsError):
        load_settings()


@given(st.ip_addresses(v=4))
def test_mapped_and_compatible_forms_never_differ_from_ipv4(ip: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert DEFAULT.is_allowed(mapped) == DEFAULT.is_allowed(ip)
    if int(ip) > 1:
        compatible = ipaddress.IPv6Address(int(ip))
        assert DEFAULT.is_allowed(compatible) == DEFAULT.is_allowed(ip)


# --- At connect time --------------------------------------------------------------


async def test_loopback_destination_is_refused_without_connecting(
    tcp_listener, client_signing_key
) -> None:
    listener = await tcp_listener()
    async with FederationClient(load_settings(), client_signing_key) as client:
        with pytest.raises(DeniedDestination) as info:
            await client.get_json(f"127.0.0.1:{listener.port}", "/x", signed=False)
    assert info.value.destination == f"127.0.0.1:{listener.port}"
    assert listener.connections == 0


@pytest.mark.parametrize("template", ["[::ffff:127.0.0.1]:{port}", "[::ffff:7f00:1]:{port}"])
async def test_ipv4_mapped_literal_cannot_bypass(
    tcp_listener, client_signing_key, template: str
) -> None:
    listener = await tcp_listener()
    async with FederationClient(load_settings(), client_signing_key) as client:
        with pytest.raises(DeniedDestination):
            await client.get_json(template.format(port=listener.port), "/x", signed=False)
    assert listener.connections == 0


async def test_hostname_resolving_to_denied_address_is_refused(
    dns_server, tcp_listener, client_signing_key, loopback_ip
) -> None:
    listener = await tcp_listener(loopback_ip)
    dns_server.add("evil.test", "A", loopback_ip)
    dns_server.add("evil.test", "AAAA", "::ffff:" + loopback_ip)
    async with FederationClient(
        load_settings(), client_signing_key, dns_resolver=dns_server.resolver()
    ) as client:
        with pytest.raises(DeniedDestination):
            await client.get_json(f"evil.test:{listener.port}", "/x", signed=False)
    assert listener.connections == 0


async def test_denied_candidates_are_skipped_for_allowed_ones(
    dns_server,
    tcp_listener,
    https_server,
    recording_app,
    client_settings,
    client_signing_key,
    tls_ca_file,
    loopback_ip,
) -> None:
    server = await https_server(recording_app, host=loopback_ip, names=["mixed.test"])
    trap = await tcp_listener("127.66.0.1", server.port)
    dns_server.add("mixed.test", "A", "127.66.0.1", loopback_ip)
    settings = client_settings(
        homeserver_denied_networks=DENIED_TEST_NETWORK, federation_ca_file=tls_ca_file
    )
    async with FederationClient(
        settings, client_signing_key, dns_resolver=dns_server.resolver()
    ) as client:
        assert await client.get_json(f"mixed.test:{server.port}", "/x", signed=False) == {
            "ok": True
        }
    assert trap.connections == 0
    assert len(recording_app.requests) == 1


async def test_well_known_delegating_to_denied_address_is_refused(
    dns_server,
    tcp_listener,
    https_server,
    recording_app,
    canned_response,
    client_settings,
    client_signing_key,
    tls_ca_file,
    loopback_ip,
) -> None:
    from warden.federation.resolver import ServerNameResolver

    trap = await tcp_listener("127.66.0.1")
    recording_app.routes["/.well-known/matrix/server"] = canned_response(
        body=f'{{"m.server": "127.66.0.1:{trap.port}"}}'.encode()
    )
    server = await https_server(recording_app, host=loopback_ip, names=["deleg.test"])
    dns_server.add("deleg.test", "A", loopback_ip)
    settings = client_settings(
        homeserver_denied_networks=DENIED_TEST_NETWORK, federation_ca_file=tls_ca_file
    )
    guard = NetworkGuard.from_settings(settings)
    context = ssl.create_default_context(cafile=tls_ca_file)
    resolver = ServerNameResolver(
        guard, ssl_context=context, dns_resolver=dns_server.resolver(), well_known_port=server.port
    )
    try:
        async with FederationClient(
            settings, client_signing_key, resolver=resolver, guard=guard
        ) as client:
            with pytest.raises(DeniedDestination) as info:
                await client.get_json("deleg.test", "/x", signed=False)
    finally:
        await resolver.aclose()
    assert info.value.address == "127.66.0.1"
    assert [r.target for r in recording_app.requests] == ["/.well-known/matrix/server"]
    assert trap.connections == 0


async def test_transport_refuses_hostnames_so_nothing_resolves_behind_the_guard(
    tcp_listener,
) -> None:
    listener = await tcp_listener()
    transport = GuardedTransport(
        NetworkGuard(["0.0.0.0/0", "::/0"], []), ssl.create_default_context()
    )
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(DeniedDestination, match="not an IP address"):
            await http.get(f"https://localhost:{listener.port}/")
    assert listener.connections == 0


def test_random_loopback_addresses_stay_outside_the_denied_test_network() -> None:
    # The well-known delegation test failed in CI when its honest server drew 127.66.x.y.
    denied = ipaddress.ip_network(DENIED_TEST_NETWORK)
    drawn = [ipaddress.ip_address(random_loopback_ip()) for _ in range(5000)]
    assert all(address.is_loopback and address not in denied for address in drawn)
