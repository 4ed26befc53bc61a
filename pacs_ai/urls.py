from __future__ import annotations

from django.contrib import admin
from django.urls import path

admin.site.site_header = "pacs-ai (AI results are not for diagnostic use)"
admin.site.site_title = "pacs-ai"

urlpatterns = [
    path("admin/", admin.site.urls),
]
