"""An IPv6 address that carries an IPv4 address is judged by that IPv4 address.

Python 3.11's `is_global` says True for `::127.0.0.1`, `2002:7f00:1::1` and `64:ff9b::7f00:1`;
each of them leads to 127.0.0.1. A forged portal or OAuth endpoint on such an address must be
refused exactly like one on 127.0.0.1 (the same path as `test_units`' plain loopback cases), and
the same forms around a public IPv4 address stay usable.
"""

from __future__ import annotations

import pytest

from b24app.bitrix import oauth


@pytest.fixture(autouse=True)
def _production_rules(settings) -> None:
    settings.B24_ALLOW_HTTP = False
    oauth._RESOLVED.clear()  # judged afresh, not from another test's cache


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("::127.0.0.1", id="ipv4-compatible-loopback"),
        pytest.param("::10.0.0.1", id="ipv4-compatible-private"),
        pytest.param("2002:7f00:1::1", id="6to4-loopback"),
        pytest.param("2002:a9fe:a9fe::1", id="6to4-cloud-metadata"),
        pytest.param("64:ff9b::7f00:1", id="nat64-loopback"),
        pytest.param("64:ff9b::a00:1", id="nat64-private"),
        pytest.param("64:ff9b:1::7f00:1", id="nat64-local-use-prefix"),
        pytest.param("64:ff9b:1:5db8:d8:2200::", id="nat64-local-use-public-inside"),
        # Judged right by Python's own `is_global` already; listed so a change there shows.
        pytest.param("::ffff:127.0.0.1", id="ipv4-mapped-loopback"),
        pytest.param("::ffff:10.0.0.1", id="ipv4-mapped-private"),
        pytest.param("2001:0:4136:e378:8000:63bf:3fff:fdd2", id="teredo"),
    ],
)
def test_an_ipv6_address_embedding_a_non_public_ipv4_is_not_public(address: str) -> None:
    with pytest.raises(oauth.UntrustedServer, match="not on a public internet host"):
        oauth.check_portal_endpoint(f"https://[{address}]/rest/")


@pytest.mark.parametrize(
    "address",
    [
        "2606:4700::1111",  # plain global IPv6
        "::ffff:93.184.216.34",
        "::93.184.216.34",
        "2002:5db8:d822::1",
        "64:ff9b::5db8:d822",
    ],
)
def test_the_same_forms_around_a_public_ipv4_are_public(address: str) -> None:
    endpoint = f"https://[{address}]/rest/"
    assert oauth.check_portal_endpoint(endpoint) == endpoint
