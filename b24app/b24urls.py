"""The Bitrix24-facing contract: the handler URLs an admin enters when registering the app."""

from django.urls import path

from b24app import views

urlpatterns = [
    path("install/", views.install, name="b24-install"),
    path("app/", views.app, name="b24-app"),
    path("events/", views.events, name="b24-events"),
]
