"""WSGI entry point: `gunicorn b24app.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

application = get_wsgi_application()

# A B24_TOKEN_KEY that cannot read the stored tokens stops the web server here (gunicorn: the
# worker fails to boot, so the server exits) rather than failing every request later.
from b24app.checks import refuse_unreadable_tokens  # noqa: E402  (needs the apps loaded)

refuse_unreadable_tokens()
