"""The DICOM listener: a C-ECHO and C-STORE SCP (pynetdicom).

The event handlers only unpack the event and call services; they return DICOM statuses and never
raise into pynetdicom. ``manage.py dicom_listener`` runs ``serve``; tests call it with
``block=False`` on a free port.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone
from pydicom import Dataset
from pydicom import uid as uids
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

from studies import selectors, services
from studies.models import AssociationLog

# pynetdicom's sop_class module is dynamic; pydicom's uid module names the storage UIDs, typed.
VERIFICATION = "1.2.840.10008.1.1"

logger = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = [
    uids.CTImageStorage,
    uids.EnhancedCTImageStorage,
    uids.ComputedRadiographyImageStorage,
    uids.DigitalXRayImageStorageForPresentation,
    uids.DigitalXRayImageStorageForProcessing,
    uids.MRImageStorage,
    uids.EnhancedMRImageStorage,
    uids.SecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uids.MultiFrameTrueColorSecondaryCaptureImageStorage,
]
# Everything a PACS commonly sends. Files are stored exactly as received: never transcoded.
TRANSFER_SYNTAXES = [
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLossless,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.HTJ2KLossless,
    uids.HTJ2KLosslessRPCL,
    uids.HTJ2K,
    uids.RLELossless,
]

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)


@dataclass
class _Tally:
    started_at: dt.datetime = field(default_factory=timezone.now)
    stored: int = 0
    failed: int = 0
    detail: str = ""


class Listener:
    """One running SCP; keeps a tally per association for the AssociationLog."""

    def __init__(self) -> None:
        self._tallies: weakref.WeakKeyDictionary[Any, _Tally] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.ae = AE(ae_title=settings.DICOM_AE_TITLE)
        self.ae.maximum_associations = settings.DICOM_MAX_ASSOCIATIONS
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs
        self.ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]

    def _tally(self, assoc: Any) -> _Tally:
        with self._lock:
            return self._tallies.setdefault(assoc, _Tally())

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        self._tally(assoc)
        calling_ae = assoc.requestor.primitive.calling_ae_title.strip()
        try:
            close_old_connections()
            allowed = selectors.calling_ae_allowed(ae_title=calling_ae, ip=assoc.requestor.address)
        except DatabaseError:
            logger.exception("cannot check the calling AE: database unavailable")
            allowed = False
        if not allowed:
            logger.warning(
                "rejected association from unknown calling AE %r at %s",
                calling_ae,
                assoc.requestor.address,
            )
            self._tally(assoc).detail = "calling AE title not recognised"
            assoc.acse.send_reject(*_REJECT_CALLING_AE)
            assoc.kill()  # waits until the A-ASSOCIATE-RJ is out before the socket closes
            connection.close()  # no release or abort event follows a rejection

    def _on_store(self, event: Any) -> Dataset | int:
        tally = self._tally(event.assoc)
        calling_ae = event.assoc.requestor.ae_title.strip()
        try:
            # The association's thread keeps its database connection until the association
            # ends: opening one per instance (and on SQLite checkpointing the WAL each time the
            # last one closed) cost more than indexing the instance. After a database error,
            # Django drops the connection if it is broken, and the next query reconnects.
            if connection.errors_occurred:
                close_old_connections()
            services.instance_store(data=event.encoded_dataset(), calling_ae=calling_ae)
        except services.StoreRefused as exc:
            tally.failed += 1
            # The reason goes to the peer only: decoder messages can quote element values.
            logger.warning("refused an instance from %s: status 0x%04X", calling_ae, exc.status)
            return _status(exc.status, exc.reason)
        except DatabaseError as exc:
            tally.failed += 1
            logger.error("database unavailable while storing: %s", type(exc).__name__)
            return _status(services.STATUS_OUT_OF_RESOURCES, "database unavailable")
        except OSError as exc:
            tally.failed += 1
            logger.error("storage error while storing: %s", exc.strerror)
            return _status(services.STATUS_OUT_OF_RESOURCES, "storage unavailable")
        except Exception:
            tally.failed += 1
            logger.exception("unexpected error while storing an instance")
            return _status(services.STATUS_PROCESSING_FAILURE, "internal error")
        tally.stored += 1
        return services.STATUS_SUCCESS

    def _on_association_end(self, event: Any) -> None:
        # Runs in the association's thread: give back its database connection.
        connection.close()

    def _on_connection_closed(self, event: Any) -> None:
        """Runs in pynetdicom's DUL thread once per connection: write the AssociationLog row."""
        assoc = event.assoc
        with self._lock:
            tally = self._tallies.pop(assoc, None)
        if tally is None or not assoc.is_acceptor:
            return
        if assoc.is_rejected:
            outcome = AssociationLog.Outcome.REJECTED
        elif assoc.is_released:
            outcome = AssociationLog.Outcome.RELEASED
        else:
            outcome = AssociationLog.Outcome.ABORTED
        try:
            services.association_log_record(
                calling_ae=assoc.requestor.primitive.calling_ae_title.strip()
                if assoc.requestor.primitive
                else "",
                called_ae=settings.DICOM_AE_TITLE,
                peer_ip=assoc.requestor.address,
                started_at=tally.started_at,
                stored=tally.stored,
                failed=tally.failed,
                outcome=outcome,
                detail=tally.detail,
            )
        except DatabaseError:
            logger.exception("could not write the association log")
        finally:
            connection.close()

    def serve(
        self, *, host: str, port: int, block: bool = True, ssl_context: ssl.SSLContext | None = None
    ) -> Any:
        """Start the SCP. With ``block=False`` returns the running server (call ``shutdown()``)."""
        return self.ae.start_server(
            (host, port), block=block, evt_handlers=self.handlers, ssl_context=ssl_context
        )


def tls_context() -> ssl.SSLContext | None:
    """The server TLS context from settings, or None when DICOM TLS is not configured.

    With ``DICOM_TLS_CA`` set, peers must present a certificate signed by that CA.
    """
    if not settings.DICOM_TLS_CERT:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY)
    if settings.DICOM_TLS_CA:
        context.load_verify_locations(cafile=settings.DICOM_TLS_CA)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _status(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response
