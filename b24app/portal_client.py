"""REST clients for a portal: every call logged, and a renamed portal followed only to the
address Bitrix24's OAuth server confirms for it (`client_for` a stored portal, `user_is_admin`
for a token not stored yet)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings

from b24app.bitrix import oauth
from b24app.bitrix.client import PortalClient
from b24app.bitrix.errors import BadRequest
from b24app.bitrix.ratelimit import INTERACTIVE_RESERVE
from b24app.calllog import record_call
from b24app.models import Portal

log = logging.getLogger(__name__)


def confirm_moved(member_id: str, server_endpoint: str) -> Callable[[str, str], str]:
    """For a portal's 302: the new address is used (and our token sent there) only when it is a
    public https host and Bitrix24's OAuth server names it as this portal's REST endpoint."""

    def confirm(new_endpoint: str, token: str) -> str:
        try:
            candidate = oauth.check_portal_endpoint(new_endpoint)
            info = oauth.app_info(server_endpoint, token)
            confirmed = oauth.check_portal_endpoint(info.client_endpoint)
        except oauth.UntrustedServer as exc:
            raise BadRequest("BAD_REDIRECT", f"not followed: {exc.description}") from None
        if (
            info.member_id != member_id
            or info.client_id != settings.B24_CLIENT_ID
            or oauth.origin_of(confirmed) != oauth.origin_of(candidate)
        ):
            log.warning("portal %s redirected to an address Bitrix24 does not confirm", member_id)
            raise BadRequest("BAD_REDIRECT", "Bitrix24 does not confirm the portal's new address")
        return confirmed

    return confirm


def client_for(
    portal: Portal,
    *,
    max_wait: float = 2.0,
    bulk: bool = False,
    timeout: tuple[float, float] | None = None,
) -> PortalClient:
    confirm = confirm_moved(portal.member_id, portal.server_endpoint)

    def moved(new_endpoint: str, token: str) -> str:
        # A renamed portal: member_id stays, the address changes. Keep the confirmed one.
        endpoint = confirm(new_endpoint, token)
        log.info("portal %s moved to a new address", portal.member_id)
        Portal.objects.filter(pk=portal.pk).update(client_endpoint=endpoint)
        portal.client_endpoint = endpoint
        return endpoint

    return PortalClient(
        member_id=portal.member_id,
        endpoint=portal.client_endpoint,
        rate=portal.rate_per_second,
        burst=portal.rate_burst,
        on_call=record_call,
        on_moved=moved,
        max_wait=max_wait,
        reserve=INTERACTIVE_RESERVE if bulk else 0,
        timeout=timeout,
    )


def user_is_admin(info: oauth.AppInfo, server_endpoint: str, access_token: str) -> bool:
    """Ask the portal, with this (already vouched-for) token, whether its owner is an admin.

    `user.admin` answers for the token's owner; nothing a request posts can change the answer.
    """
    portal = Portal.objects.filter(member_id=info.member_id).first()
    client = PortalClient(
        member_id=info.member_id,
        endpoint=oauth.check_portal_endpoint(info.client_endpoint),
        rate=portal.rate_per_second if portal else None,
        burst=portal.rate_burst if portal else None,
        on_call=record_call,
        on_moved=confirm_moved(info.member_id, server_endpoint),
        max_wait=1.0,
        timeout=settings.B24_WEB_TIMEOUT,  # asked inside a web request
    )
    result = client.call("user.admin", token=access_token).result
    return result is True or str(result).lower() in {"true", "1", "y"}


def portal_follow_endpoint(portal: Portal, info: oauth.AppInfo) -> Portal:
    """Each verified open carries Bitrix24's current address of the portal (app.info): a rename
    changes the host, and the frame's parent is the new one, so store it at once."""
    endpoint = oauth.check_portal_endpoint(info.client_endpoint)
    domain = info.domain[:255] or portal.domain
    if endpoint != portal.client_endpoint or domain != portal.domain:
        log.info("portal %s has a new address (from app.info)", portal.member_id)
        Portal.objects.filter(pk=portal.pk).update(client_endpoint=endpoint, domain=domain)
        portal.client_endpoint, portal.domain = endpoint, domain
    return portal
