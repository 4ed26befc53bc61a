"""The listener's upper layer against a raw socket peer: fragmentation, limits and bad peers.

pynetdicom's and DCMTK's SCUs (test_listener, test_dcmtk) send well-formed streams in their
own fragment sizes; here the byte stream is built by hand to reach what they never send.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from studies import storage
from studies.listener import Listener
from studies.models import AssociationLog, Instance
from tests.conftest import free_port, wait_for
from tests.factories import make_dataset

A_ASSOCIATE_AC, P_DATA_TF, A_ABORT = 0x02, 0x04, 0x07


class RawPeer:
    """A TCP peer that speaks the upper layer byte by byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def associate(self) -> int:
        """Propose CT Image Storage (explicit VR little endian) as context 1; the reply's type."""
        request = A_ASSOCIATE()
        request.application_context_name = "1.2.840.10008.3.1.1.1"
        request.calling_ae_title, request.called_ae_title = "RAWPEER", "PACS_AI"
        context = build_context(CTImageStorage, ExplicitVRLittleEndian)
        context.context_id = 1
        request.presentation_context_definition_list = [context]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 16384
        request.user_information = [max_length]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        self.sock.sendall(pdu.encode())
        return self.read_pdu()[0]

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._read(6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, self._read(length)

    def closed(self) -> bool:
        """Whether the listener closed the connection (reset, if our bytes were left unread)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data


def p_data(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, fragment) items."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, ctrl) + data for cx, ctrl, data in items)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def store_request(ds: Dataset) -> tuple[bytes, bytes]:
    """The encoded command set and data set of a C-STORE request for ``ds``."""
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 0
    request.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command, data_set = encode(message.command_set, True, True), encode(ds, False, True)
    assert command is not None
    assert data_set is not None
    return command, data_set


def response_status(body: bytes) -> int:
    """The Status of a response carried whole in one P-DATA-TF item."""
    (item_length,) = struct.unpack(">L", body[:4])
    return int(decode(BytesIO(body[6 : 4 + item_length]), True, True).Status)


def test_fragmented_command_and_data_set_are_reassembled(listener, storage_dir):
    ds = make_dataset(rows=64, columns=64)
    command, data_set = store_request(ds)
    peer = RawPeer(listener)
    assert peer.associate() == A_ASSOCIATE_AC

    # The command in two PDUs; the data set in 100-byte fragments, several to a PDU.
    peer.sock.sendall(p_data((1, 0x01, command[:20])) + p_data((1, 0x03, command[20:])))
    fragments = [data_set[i : i + 100] for i in range(0, len(data_set), 100)]
    for start in range(0, len(fragments), 7):
        batch = fragments[start : start + 7]
        items = [(1, 0x00, fragment) for fragment in batch]
        if start + 7 >= len(fragments):
            items[-1] = (1, 0x02, batch[-1])
        peer.sock.sendall(p_data(*items))
    pdu_type, body = peer.read_pdu()

    assert pdu_type == P_DATA_TF
    assert response_status(body) == 0x0000
    stored = dcmread(storage_dir / Instance.objects.get().file_path)
    assert stored == ds
    assert stored.file_meta.SourceApplicationEntityTitle == "RAWPEER"


def test_a_peer_that_vanishes_mid_data_set_leaves_no_row_and_no_file(listener, storage_dir):
    command, data_set = store_request(make_dataset(rows=256, columns=256))
    peer = RawPeer(listener)
    assert peer.associate() == A_ASSOCIATE_AC

    peer.sock.sendall(p_data((1, 0x03, command), (1, 0x00, data_set[: len(data_set) // 2])))
    # The listener has begun writing the data set: the test can fail if it keeps the part.
    wait_for(
        lambda: any(p.stat().st_size for p in (storage_dir / ".incoming").glob("*")), timeout=10
    )
    peer.sock.close()

    log = wait_for(lambda: AssociationLog.objects.first(), timeout=10)
    assert (log.outcome, log.instances_stored) == ("aborted", 0)
    assert not Instance.objects.exists()
    assert not [p for p in storage_dir.rglob("*") if p.is_file()]


def test_data_on_a_context_that_was_not_accepted_aborts_the_association(listener):
    command, _ = store_request(make_dataset())
    peer = RawPeer(listener)
    assert peer.associate() == A_ASSOCIATE_AC

    peer.sock.sendall(p_data((3, 0x03, command)))

    assert peer.read_pdu()[0] == A_ABORT
    assert peer.closed()
    log = wait_for(lambda: AssociationLog.objects.first(), timeout=10)
    assert log.outcome == "aborted"
    assert "presentation context" in log.detail


def test_a_stream_that_is_not_dicom_gets_an_abort(listener):
    peer = RawPeer(listener)

    peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    assert peer.read_pdu()[0] == A_ABORT
    assert peer.closed()


def test_a_garbled_association_request_gets_an_abort_and_the_listener_serves_on(listener):
    peer = RawPeer(listener)
    junk = bytes(range(256)) * 2

    peer.sock.sendall(struct.pack(">BBL", 0x01, 0, len(junk)) + junk)

    assert peer.read_pdu()[0] == A_ABORT
    assert peer.closed()
    assert RawPeer(listener).associate() == A_ASSOCIATE_AC


def test_over_the_association_limit_a_peer_is_rejected_for_now(listener, settings):
    settings.DICOM_MAX_ASSOCIATIONS = 1
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    first = ae.associate("127.0.0.1", listener)
    second = ae.associate("127.0.0.1", listener)

    assert first.is_established
    assert second.is_rejected
    rejection = second.acceptor.primitive
    assert rejection is not None
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    first.release()
    third = ae.associate("127.0.0.1", listener)
    assert third.is_established
    third.release()
    log = wait_for(lambda: AssociationLog.objects.filter(outcome="rejected").first(), timeout=10)
    assert log.detail == "too many associations"


def test_incoming_files_of_an_interrupted_transfer_are_removed_at_start(transactional_db):
    incoming = storage.IncomingFile()
    incoming.write(b"part of a data set")
    stale = incoming.path
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fresh = storage.IncomingFile()  # another listener's transfer in progress

    server = Listener().serve(host="127.0.0.1", port=free_port(), block=False)
    server.shutdown()

    assert not stale.exists()
    assert fresh.path.exists()
    incoming.discard()
    fresh.discard()
