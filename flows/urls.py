from django.urls import path

from flows import views

urlpatterns = [
    path("api/pin", views.pin, name="flows-pin"),
    path("api/status", views.status, name="flows-status"),
    path("api/add", views.add_flow, name="flows-add"),
    path("api/rows", views.rows, name="flows-rows"),
]
