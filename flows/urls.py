from django.urls import path

from flows import adminview, api

urlpatterns = [
    path("api/pin", api.pin, name="flows-pin"),
    path("api/status", api.status, name="flows-status"),
    path("api/add", api.add_flow, name="flows-add"),
    path("api/rows", api.rows, name="flows-rows"),
    path("api/check", api.check_pins, name="flows-check"),
    path("api/admin", adminview.admin_status, name="flows-admin"),
    path("api/admin/rebind", adminview.admin_rebind, name="flows-admin-rebind"),
]
