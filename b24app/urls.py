from django.contrib import admin
from django.urls import include, path

from b24app import health, metrics_view

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("ping", health.ping, name="ping"),
    path("metrics", metrics_view.scrape, name="metrics"),
    path("admin/", admin.site.urls),
    path("b24/", include("b24app.b24urls")),
    path("flows/", include("flows.urls")),
]
