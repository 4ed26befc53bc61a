"""The DICOM upper layer (PS3.8) as the listener speaks it: PDUs in, PDUs out, on one socket,
and the few DIMSE commands (PS3.7) a storage SCP reads and writes.

pynetdicom decodes the A-ASSOCIATE-RQ, negotiates presentation contexts and encodes the
A-ASSOCIATE-AC, -RJ and A-ABORT. This module moves the bytes, and encodes the small
fixed-layout command sets and file meta headers itself: building pydicom datasets for those
cost more than storing an instance. P-DATA is read straight from the socket into a reusable
buffer and handed on in pieces, so a data set is never copied whole in memory. pynetdicom's
own reactor polls the socket and its queues with 1 ms sleeps and copies each PDU several
times; it held the listener to a fraction of DCMTK's throughput.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID, generate_uid
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from studies.storage import InvalidUID, sanitise_uid

A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07
_KNOWN_TYPES = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}
_A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

APPLICATION_CONTEXT_NAME = UID("1.2.840.10008.3.1.1.1")
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["pacs-ai", "dicom-listener"])
IMPLEMENTATION_VERSION_NAME = "PACS_AI_1"
# Our maximum P-DATA PDU length: no limit, because data is streamed rather than buffered.
# Command sets are buffered and must stay small.
MAX_PDU_LENGTH = 0
MAX_COMMAND_BYTES = 64 * 1024

# A-ABORT provider reasons (PS3.8 9.3.8).
NOT_SPECIFIED = 0x00
UNRECOGNISED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PARAMETER = 0x06


class PeerGone(Exception):
    """The peer closed the connection, aborted, or stopped sending for the network timeout."""


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted with ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Connection:
    """One TCP (or TLS) connection to a peer, read a PDU at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = memoryview(bytearray(1 << 20))

    def read_exact(self, size: int) -> bytes:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            view = view[self._recv_into(view, len(view)) :]
        return bytes(data)

    def stream(self, size: int, sink: Callable[[memoryview], None]) -> None:
        """Read ``size`` bytes and hand them to ``sink`` as they arrive, in pieces."""
        while size:
            got = self._recv_into(self._buffer, min(size, len(self._buffer)))
            sink(self._buffer[:got])
            size -= got

    def read_pdu_header(self) -> tuple[int, int]:
        """The next PDU's type and length; an unknown type aborts the association."""
        pdu_type, _, length = struct.unpack(">BBL", self.read_exact(6))
        if pdu_type not in _KNOWN_TYPES:
            raise ProtocolError(UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
        return pdu_type, length

    def read_association_request(self, max_length: int = 1 << 20) -> A_ASSOCIATE:
        pdu_type, length = self.read_pdu_header()
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got type {pdu_type}")
        if length > max_length:
            raise ProtocolError(INVALID_PARAMETER, "A-ASSOCIATE-RQ too long")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(struct.pack(">BBL", pdu_type, 0, length) + self.read_exact(length))
            request = pdu.to_primitive()
        except PeerGone:
            raise
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises many types for bad input
            raise ProtocolError(
                INVALID_PARAMETER, f"A-ASSOCIATE-RQ cannot be decoded: {type(exc).__name__}"
            ) from None
        if not pdu.protocol_version & 1:
            raise ProtocolError(INVALID_PARAMETER, "unsupported protocol version")
        return request

    def accept(self, request: A_ASSOCIATE, results: list[PresentationContext]) -> None:
        """Send the A-ASSOCIATE-AC with the negotiated presentation contexts."""
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = MAX_PDU_LENGTH
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [max_length, class_uid, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        self.send(pdu.encode())

    def reject(self, result: int, source: int, reason: int) -> None:
        """Send an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
        pdu = A_ASSOCIATE_RJ()
        pdu.result, pdu.source, pdu.reason_diagnostic = result, source, reason
        self.send(pdu.encode())

    def send(self, data: bytes) -> None:
        """Send ``data``; a broken connection raises ``PeerGone``."""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise PeerGone(f"connection lost: {exc.strerror or exc}") from None

    def send_release_response(self) -> None:
        self.send(_A_RELEASE_RP)

    def send_abort(self, reason: int) -> None:
        """Send an A-ABORT from the service provider, if the peer is still there to get it."""
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = 0x02, reason
        with contextlib.suppress(PeerGone):
            self.send(pdu.encode())

    def _recv_into(self, view: memoryview, size: int) -> int:
        try:
            got = self.sock.recv_into(view, size)
        except TimeoutError:
            raise PeerGone("network timeout") from None
        except OSError as exc:
            raise PeerGone(f"connection lost: {exc.strerror or exc}") from None
        if not got:
            raise PeerGone("connection closed by the peer")
        return got


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE request's command set (PS3.7 E.1) that a storage SCP acts on."""

    field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str
    sop_instance_uid: str


C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_C_STORE_RSP, _C_ECHO_RSP = 0x8001, 0x8030
_NO_DATA_SET = 0x0101
_UINT16 = struct.Struct("<H")


def parse_command(encoded: bytes) -> Command:
    """Read a command set (implicit VR little endian, group 0000)."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(encoded):
        if offset + 8 > len(encoded):
            raise ProtocolError(INVALID_PARAMETER, "command set truncated")
        group, element, length = struct.unpack_from("<HHL", encoded, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(encoded):
            raise ProtocolError(INVALID_PARAMETER, "command set malformed")
        values[element] = encoded[offset : offset + length]
        offset += length
    try:
        return Command(
            field=_UINT16.unpack(values[0x0100])[0],
            message_id=_UINT16.unpack(values[0x0110])[0],
            has_data_set=_UINT16.unpack(values[0x0800])[0] != _NO_DATA_SET,
            sop_class_uid=_text(values.get(0x0002, b"")),
            sop_instance_uid=_text(values.get(0x1000, b"")),
        )
    except (KeyError, struct.error):
        raise ProtocolError(INVALID_PARAMETER, "command set lacks a required element") from None


def response_pdus(
    command: Command, *, context_id: int, status: int, comment: str, max_pdu: int
) -> bytes:
    """The P-DATA-TF PDUs of the C-STORE-RSP or C-ECHO-RSP to ``command``.

    The request's UIDs are echoed only when they are UIDs; ``comment`` goes with failures only.
    """
    is_echo = command.field == C_ECHO_RQ
    elements = []
    if _is_uid(command.sop_class_uid):
        elements.append(_implicit(0x0002, _padded(command.sop_class_uid, b"\x00")))
    elements.append(_implicit(0x0100, _UINT16.pack(_C_ECHO_RSP if is_echo else _C_STORE_RSP)))
    elements.append(_implicit(0x0120, _UINT16.pack(command.message_id)))
    elements.append(_implicit(0x0800, _UINT16.pack(_NO_DATA_SET)))
    elements.append(_implicit(0x0900, _UINT16.pack(status)))
    if comment and status != 0x0000:
        elements.append(_implicit(0x0902, _padded(comment[:64], b" ")))
    if not is_echo and _is_uid(command.sop_instance_uid):
        elements.append(_implicit(0x1000, _padded(command.sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    encoded = _implicit(0x0000, struct.pack("<L", len(body))) + body
    room = max_pdu - 6 if max_pdu else len(encoded)
    pdus = []
    for start in range(0, len(encoded), room):
        fragment = encoded[start : start + room]
        last = 0x02 if start + room >= len(encoded) else 0x00
        item = struct.pack(">LBB", len(fragment) + 2, context_id, 0x01 | last) + fragment
        pdus.append(struct.pack(">BBL", P_DATA_TF_TYPE, 0, len(item)) + item)
    return b"".join(pdus)


def part10_header(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The preamble and File Meta Information (PS3.10 7.1) of a received instance's file."""
    elements = [
        struct.pack("<HH2s2xL", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
        _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _explicit(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _explicit(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae:
        elements.append(_explicit(0x0016, b"AE", _padded(source_ae[:16], b" ")))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii", "replace")
    return value + pad if len(value) % 2 else value


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def _is_uid(value: str) -> bool:
    try:
        return bool(sanitise_uid(value))
    except InvalidUID:
        return False
