"""Reads for the studies app."""

from __future__ import annotations

from django.conf import settings

from studies.models import DicomNode


def calling_ae_allowed(*, ae_title: str, ip: str) -> bool:
    """Whether a calling AE (from that IP) may open an association to store studies."""
    if settings.DICOM_ACCEPT_ALL:
        return True
    ae_title = ae_title.strip()
    for entry in settings.DICOM_ALLOWED_AETS:
        allowed_ae, _, allowed_ip = entry.partition("@")
        if allowed_ae == ae_title and allowed_ip in ("", ip):
            return True
    nodes = DicomNode.objects.filter(ae_title=ae_title, may_store=True)
    return any(node.restrict_to_ip in (None, ip) for node in nodes)


def quiet_seconds(modality: str) -> float:
    """How long a series of this modality must be quiet before it counts as complete."""
    quiet: dict[str, float] = settings.SERIES_QUIET_SECONDS
    return quiet.get(modality.upper(), quiet["*"])
