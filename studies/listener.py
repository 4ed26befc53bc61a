"""The DICOM listener: a C-ECHO and C-STORE SCP.

One thread per association. Each C-STORE's data set is streamed from the socket into a file
under the storage's incoming folder as it arrives; once the last fragment is in, the file is
flushed to disk, checked, moved into place and indexed (``services.instance_store_received``),
and only then does the peer get its status. pynetdicom negotiates the association and encodes
the PDUs and DIMSE responses (``studies.upper_layer``). ``manage.py dicom_listener`` runs
``serve``; tests call it with ``block=False`` on a free port.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import socketserver
import ssl
import struct
import threading
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone
from pydicom import uid as uids
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from studies import selectors, services, storage
from studies.models import AssociationLog
from studies.upper_layer import (
    A_ABORT_TYPE,
    A_RELEASE_RQ_TYPE,
    APPLICATION_CONTEXT_NAME,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    INVALID_PARAMETER,
    MAX_COMMAND_BYTES,
    NOT_SPECIFIED,
    P_DATA_TF_TYPE,
    UNEXPECTED_PDU,
    Command,
    Connection,
    PeerGone,
    ProtocolError,
    parse_command,
    part10_header,
    response_pdus,
)

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
TRANSFER_SYNTAXES: list[str | uids.UID] = [
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

# Seconds to wait for the A-ASSOCIATE-RQ (PS3.8's ARTIM timer), then for each read after it.
ASSOCIATION_REQUEST_TIMEOUT_S = 30.0
NETWORK_TIMEOUT_S = 60.0
# Incoming files older than this at start-up belong to a process that died mid-transfer.
STALE_INCOMING_S = 3600.0

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class Listener:
    """The SCP: what it accepts, and how many associations it serves at once."""

    def __init__(self) -> None:
        self.contexts = [build_context(VERIFICATION)] + [
            build_context(sop_class, TRANSFER_SYNTAXES) for sop_class in STORAGE_SOP_CLASSES
        ]
        self._lock = threading.Lock()
        self._active = 0
        self._sockets: set[socket.socket] = set()

    def serve(
        self, *, host: str, port: int, block: bool = True, ssl_context: ssl.SSLContext | None = None
    ) -> Server:
        """Start the SCP. With ``block=False`` returns the running server (call ``shutdown()``);
        otherwise serves until SIGINT or SIGTERM, then aborts the open associations."""
        removed = storage.remove_stale_incoming(older_than_s=STALE_INCOMING_S)
        if removed:
            logger.warning("removed %d incoming files left by an interrupted transfer", removed)
        server = Server((host, port), self, ssl_context)
        thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
        thread.start()
        if block:
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            stop.wait()
            server.shutdown()
        return server

    def handle(
        self, sock: socket.socket, address: tuple[str, int], tls: ssl.SSLContext | None
    ) -> None:
        """Serve one connection, from the TLS handshake (if any) to the association's end."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(ASSOCIATION_REQUEST_TIMEOUT_S)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                logger.warning("TLS handshake with %s failed: %s", address[0], exc)
                return
        with self._lock:
            self._sockets.add(sock)
        try:
            _Association(self, Connection(sock), address[0]).run()
        finally:
            with self._lock:
                self._sockets.discard(sock)
            sock.close()

    def try_reserve(self) -> bool:
        """Count one more association, unless ``DICOM_MAX_ASSOCIATIONS`` are already open."""
        with self._lock:
            if self._active >= settings.DICOM_MAX_ASSOCIATIONS:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._active -= 1

    def abort_all(self) -> None:
        """Cut every open connection: their transfers were not acknowledged and will be resent."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    block_on_close = True  # server_close() waits for the association threads

    def __init__(
        self, address: tuple[str, int], listener: Listener, tls: ssl.SSLContext | None
    ) -> None:
        self.listener = listener
        self.tls = tls
        super().__init__(address, socketserver.BaseRequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.listener.handle(request, client_address, self.tls)

    def shutdown(self) -> None:
        """Stop accepting, abort the open associations and wait for their threads."""
        super().shutdown()
        self.listener.abort_all()
        self.server_close()


class _Association:
    """One association, as the acceptor: negotiate, then serve until release or abort."""

    def __init__(self, listener: Listener, conn: Connection, peer_ip: str) -> None:
        self.listener = listener
        self.conn = conn
        self.peer_ip = peer_ip
        self.started_at = timezone.now()
        self.calling_ae = ""
        self.stored = self.failed = 0
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0
        self.command = bytearray()
        self.store: _IncomingStore | None = None
        # The next C-STORE's file, made while the peer prepares it rather than once it arrives.
        self.spare: storage.IncomingFile | None = None
        self.touches = services.SeriesTouches()

    def run(self) -> None:
        try:
            request = self.conn.read_association_request()
        except ProtocolError as exc:
            self.conn.send_abort(exc.reason)
            logger.warning("aborted a connection from %s: %s", self.peer_ip, exc)
            return
        except PeerGone as exc:
            logger.info("connection from %s ended before an association: %s", self.peer_ip, exc)
            return
        self.calling_ae = request.calling_ae_title.strip()
        rejection = self._rejection(request)
        if rejection:
            self._log(AssociationLog.Outcome.REJECTED, rejection)
            return
        try:
            self._accept(request)
            self._serve()
            outcome, detail = AssociationLog.Outcome.RELEASED, ""
        except ProtocolError as exc:
            self.conn.send_abort(exc.reason)
            logger.warning("aborted the association from %s: %s", self.calling_ae, exc)
            outcome, detail = AssociationLog.Outcome.ABORTED, str(exc)
        except PeerGone as exc:
            outcome, detail = AssociationLog.Outcome.ABORTED, str(exc)
        except Exception:
            logger.exception("aborted the association from %s: internal error", self.calling_ae)
            self.conn.send_abort(NOT_SPECIFIED)
            outcome, detail = AssociationLog.Outcome.ABORTED, "internal error"
        finally:
            self.listener.release()
            if self.store is not None:
                self.store.discard()
            if self.spare is not None:
                self.spare.discard()
        self._log(outcome, detail)

    def _rejection(self, request: A_ASSOCIATE) -> str:
        """Send an A-ASSOCIATE-RJ and return why, or reserve a place and return ''."""
        if request.application_context_name != APPLICATION_CONTEXT_NAME:
            reason, detail = _REJECT_APPLICATION_CONTEXT, "application context not supported"
        elif not self._caller_allowed():
            reason, detail = _REJECT_CALLING_AE, "calling AE title not recognised"
        elif not self.listener.try_reserve():
            reason, detail = _REJECT_LOCAL_LIMIT, "too many associations"
        else:
            return ""
        logger.warning(
            "rejected association from %r at %s: %s", self.calling_ae, self.peer_ip, detail
        )
        with contextlib.suppress(PeerGone):
            self.conn.reject(*reason)
        return detail

    def _caller_allowed(self) -> bool:
        try:
            close_old_connections()
            return selectors.calling_ae_allowed(ae_title=self.calling_ae, ip=self.peer_ip)
        except DatabaseError:
            logger.exception("cannot check the calling AE: database unavailable")
            return False

    def _accept(self, request: A_ASSOCIATE) -> None:
        results, _ = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.listener.contexts
        )
        self.contexts = {int(cx.context_id or 0): cx for cx in results if cx.result == 0x00}
        for item in request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
        self.conn.accept(request, results)
        self.conn.sock.settimeout(NETWORK_TIMEOUT_S)

    def _serve(self) -> None:
        while True:
            pdu_type, length = self.conn.read_pdu_header()
            if pdu_type == P_DATA_TF_TYPE:
                self._p_data(length)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self.conn.read_exact(length)
                if self.command or self.store is not None:
                    raise ProtocolError(UNEXPECTED_PDU, "release requested within a message")
                self.conn.send_release_response()
                return
            elif pdu_type == A_ABORT_TYPE:
                raise PeerGone("aborted by the peer")
            else:
                raise ProtocolError(UNEXPECTED_PDU, f"unexpected PDU type {pdu_type}")

    def _p_data(self, length: int) -> None:
        """Read one P-DATA-TF PDU: its items carry command or data set fragments."""
        while length:
            if length < 6:
                raise ProtocolError(INVALID_PARAMETER, "P-DATA-TF item truncated")
            item_length, context_id, control = struct.unpack(">LBB", self.conn.read_exact(6))
            length -= 4 + item_length
            if item_length < 2 or length < 0:
                raise ProtocolError(INVALID_PARAMETER, "P-DATA-TF item length out of bounds")
            if context_id not in self.contexts:
                raise ProtocolError(INVALID_PARAMETER, "presentation context not accepted")
            size, last = item_length - 2, bool(control & 0x02)
            if control & 0x01:
                if self.store is not None or len(self.command) + size > MAX_COMMAND_BYTES:
                    raise ProtocolError(INVALID_PARAMETER, "unexpected or oversized command")
                self.command += self.conn.read_exact(size)
                if last:
                    command, self.command = bytes(self.command), bytearray()
                    self._on_command(context_id, command)
            else:
                store = self.store
                if store is None or store.context_id != context_id:
                    raise ProtocolError(INVALID_PARAMETER, "data set without its command")
                self.conn.stream(size, store.write)
                if last:
                    self.store = None
                    self._on_store(store)

    def _on_command(self, context_id: int, encoded: bytes) -> None:
        command = parse_command(encoded)
        if command.field == C_ECHO_RQ:
            self._respond(context_id, command, None)
        elif command.field == C_STORE_RQ and command.has_data_set:
            spare, self.spare = self.spare, None
            self.store = _IncomingStore(
                context_id=context_id,
                command=command,
                transfer_syntax=self.contexts[context_id].transfer_syntax[0],
                calling_ae=self.calling_ae,
                file=spare,
                touches=self.touches,
            )
        elif command.field == C_STORE_RQ:
            self.failed += 1
            refusal = services.StoreRefused(services.STATUS_CANNOT_DECODE, "no data set")
            self._respond(context_id, command, refusal)
        elif command.field != C_CANCEL_RQ:
            raise ProtocolError(UNEXPECTED_PDU, f"unsupported DIMSE command 0x{command.field:04X}")

    def _on_store(self, store: _IncomingStore) -> None:
        refusal = store.finish()
        if refusal is None:
            self.stored += 1
        else:
            self.failed += 1
            # The reason goes to the peer only: decoder messages can quote element values.
            logger.warning(
                "refused an instance from %s: status 0x%04X", self.calling_ae, refusal.status
            )
        self._respond(store.context_id, store.command, refusal)
        if self.spare is None:
            with contextlib.suppress(OSError):  # the next C-STORE will try again, and say why
                self.spare = storage.IncomingFile()

    def _respond(
        self, context_id: int, command: Command, refusal: services.StoreRefused | None
    ) -> None:
        status, comment = (
            (services.STATUS_SUCCESS, "") if refusal is None else (refusal.status, refusal.reason)
        )
        self.conn.send(
            response_pdus(
                command,
                context_id=context_id,
                status=status,
                comment=comment,
                max_pdu=self.peer_max_pdu,
            )
        )

    def _log(self, outcome: str, detail: str) -> None:
        """Write the AssociationLog row, then give back this thread's database connection."""
        logger.info(
            "association from %s %s: %d stored, %d failed",
            self.calling_ae,
            outcome,
            self.stored,
            self.failed,
        )
        try:
            services.association_log_record(
                calling_ae=self.calling_ae,
                called_ae=settings.DICOM_AE_TITLE,
                peer_ip=self.peer_ip,
                started_at=self.started_at,
                stored=self.stored,
                failed=self.failed,
                outcome=outcome,
                detail=detail,
            )
        except DatabaseError:
            logger.exception("could not write the association log")
        finally:
            connection.close()


class _IncomingStore:
    """One C-STORE's data set on its way to disk. A refused one is read and thrown away, so
    that the peer gets its failure status at the end of the message."""

    def __init__(
        self,
        *,
        context_id: int,
        command: Command,
        transfer_syntax: str,
        calling_ae: str,
        file: storage.IncomingFile | None,
        touches: services.SeriesTouches,
    ) -> None:
        self.context_id = context_id
        self.command = command
        self.calling_ae = calling_ae
        self.touches = touches
        self.refusal: services.StoreRefused | None = None
        self.file = file  # a file made ahead, or None; discarded with the store if refused
        try:
            header = part10_header(
                sop_class_uid=storage.sanitise_uid(command.sop_class_uid),
                sop_instance_uid=storage.sanitise_uid(command.sop_instance_uid),
                transfer_syntax=transfer_syntax,
                source_ae=calling_ae,
            )
            services.check_free_disk()
            if self.file is None:
                self.file = storage.IncomingFile()
            self.file.write(header)
        except storage.InvalidUID:
            self._refuse(
                services.StoreRefused(services.STATUS_MISSING_UID, "request without valid SOP UIDs")
            )
        except services.StoreRefused as exc:
            self._refuse(exc)
        except OSError as exc:
            self._storage_failed(exc)

    def write(self, chunk: memoryview) -> None:
        if self.file is None:
            return
        try:
            self.file.write(chunk)
        except OSError as exc:
            self._storage_failed(exc)

    def finish(self) -> services.StoreRefused | None:
        """Store what was received; return why not, if it was not."""
        if self.file is None:
            return self.refusal
        incoming, self.file = self.file, None
        # The association's thread keeps its database connection until the association ends:
        # opening one per instance (and on SQLite checkpointing the WAL each time the last one
        # closed) cost more than indexing the instance. After a database error, Django drops
        # the connection if it is broken, and the next query reconnects.
        if connection.errors_occurred:
            close_old_connections()
        try:
            services.instance_store_received(
                incoming=incoming, calling_ae=self.calling_ae, touches=self.touches
            )
        except services.StoreRefused as exc:
            return exc
        except DatabaseError as exc:
            logger.error("database unavailable while storing: %s", type(exc).__name__)
            return services.StoreRefused(services.STATUS_OUT_OF_RESOURCES, "database unavailable")
        except OSError as exc:
            logger.error("storage error while storing: %s", exc.strerror)
            return services.StoreRefused(services.STATUS_OUT_OF_RESOURCES, "storage unavailable")
        except Exception:
            logger.exception("unexpected error while storing an instance")
            return services.StoreRefused(services.STATUS_PROCESSING_FAILURE, "internal error")
        return None

    def discard(self) -> None:
        """Drop a data set that never arrived in full: nothing was acknowledged."""
        if self.file is not None:
            self.file.discard()
            self.file = None

    def _refuse(self, refusal: services.StoreRefused) -> None:
        self.discard()
        self.refusal = refusal

    def _storage_failed(self, exc: OSError) -> None:
        logger.error("storage error while receiving: %s", exc.strerror)
        self._refuse(services.StoreRefused(services.STATUS_OUT_OF_RESOURCES, "storage unavailable"))


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
