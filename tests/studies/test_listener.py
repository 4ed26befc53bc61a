"""Real associations on loopback: pynetdicom's SCU against the listener."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE

from studies.listener import VERIFICATION as Verification
from studies.models import AssociationLog, DicomNode, Instance
from studies.services import STATUS_OUT_OF_RESOURCES
from tests.conftest import free_port, wait_for
from tests.factories import CR_JPEG, CT_SERIES, make_dataset


def scu(*contexts: str, ae_title: str = "MODALITY") -> AE:
    ae = AE(ae_title=ae_title)
    for context in contexts or (CTImageStorage,):
        ae.add_requested_context(context)
    return ae


def test_it_answers_echo(listener):
    assoc = scu(Verification).associate("127.0.0.1", listener, ae_title="PACS_AI")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_store_is_acknowledged_once_stored_and_the_association_is_logged(listener, storage_dir):
    ds = make_dataset()
    assoc = scu().associate("127.0.0.1", listener)

    status = assoc.send_c_store(ds)
    assoc.release()

    assert status.Status == 0x0000
    instance = Instance.objects.get()
    assert dcmread(storage_dir / instance.file_path) == ds
    log = wait_for(lambda: AssociationLog.objects.first(), timeout=10)
    assert (log.calling_ae, log.outcome, log.instances_stored) == ("MODALITY", "released", 1)


def test_the_jpeg_cr_is_stored_without_transcoding(listener, storage_dir):
    sent = dcmread(CR_JPEG)
    ae = scu()
    ae.add_requested_context(SecondaryCaptureImageStorage, sent.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener)

    assert assoc.send_c_store(sent).Status == 0x0000
    assoc.release()

    stored = dcmread(storage_dir / Instance.objects.get().file_path)
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored == sent
    assert stored.pixel_array.shape == (1024, 1024)


def test_a_deflated_instance_is_stored_as_sent(listener, storage_dir):
    sent = make_dataset(rows=64, columns=64)
    sent.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener)

    assert assoc.send_c_store(sent).Status == 0x0000
    assoc.release()

    stored = dcmread(storage_dir / Instance.objects.get().file_path)
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored == sent


def test_an_unknown_calling_ae_is_rejected_at_association(listener, settings):
    settings.DICOM_ACCEPT_ALL = False
    DicomNode.objects.create(name="pacs", ae_title="KNOWN", host="127.0.0.1", may_store=True)

    rejected = scu(ae_title="STRANGER").associate("127.0.0.1", listener)
    accepted = scu(ae_title="KNOWN").associate("127.0.0.1", listener)

    assert rejected.is_rejected
    assert accepted.is_established
    accepted.release()
    log = wait_for(lambda: AssociationLog.objects.filter(outcome="rejected").first(), timeout=10)
    assert log.calling_ae == "STRANGER"
    assert log.detail == "calling AE title not recognised"


def test_a_node_restricted_to_another_ip_is_rejected(listener, settings):
    settings.DICOM_ACCEPT_ALL = False
    DicomNode.objects.create(
        name="pacs", ae_title="KNOWN", host="10.0.0.5", restrict_to_ip="10.0.0.5"
    )
    settings.DICOM_ALLOWED_AETS = ["OTHER@127.0.0.1"]

    assert scu(ae_title="KNOWN").associate("127.0.0.1", listener).is_rejected
    other = scu(ae_title="OTHER").associate("127.0.0.1", listener)
    assert other.is_established
    other.release()


def test_below_the_disk_floor_the_peer_gets_out_of_resources(listener, settings):
    settings.DICOM_MIN_FREE_DISK_MB = 1 << 40
    assoc = scu().associate("127.0.0.1", listener)

    status = assoc.send_c_store(make_dataset())
    assoc.release()

    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert not Instance.objects.exists()


def test_a_dataset_missing_its_series_uid_gets_a_failure_and_no_row(listener):
    ds = make_dataset()
    del ds.SeriesInstanceUID
    assoc = scu().associate("127.0.0.1", listener)

    status = assoc.send_c_store(ds)
    assoc.release()

    assert 0xC000 <= status.Status <= 0xCFFF
    assert not Instance.objects.exists()


def test_a_truncated_byte_stream_gets_a_failure_and_leaves_nothing(listener, tmp_path):
    original = sorted(CT_SERIES.glob("*.dcm"))[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(original[:-10_000])
    assoc = scu().associate("127.0.0.1", listener)

    status = assoc.send_c_store(truncated)  # a path: pynetdicom sends the bytes undecoded
    assoc.release()

    assert 0xC000 <= status.Status <= 0xCFFF
    assert not Instance.objects.exists()
    assert not [p for p in (tmp_path / "dicom").rglob("*") if p.is_file()]


def test_a_tls_association_stores(transactional_db, settings, storage_dir):
    from studies.listener import Listener

    settings.DICOM_ACCEPT_ALL = True
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_context)
    ca.issue_cert("modality.example").configure_cert(client_context)
    port = free_port()
    server = Listener().serve(host="127.0.0.1", port=port, block=False, ssl_context=server_context)
    try:
        plain = scu().associate("127.0.0.1", port)
        assert not plain.is_established
        assoc = scu().associate("127.0.0.1", port, tls_args=(client_context, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_store(make_dataset()).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert Instance.objects.count() == 1


def database_unreachable(monkeypatch, storage_dir) -> None:
    """Point the default database at nothing: an association's thread opens its own
    connection from these settings, and cannot connect."""
    from django.db import connections

    unreachable = dict(connections.settings["default"])
    if unreachable["ENGINE"].endswith("sqlite3"):
        unreachable["NAME"] = str(storage_dir / "no-such-dir" / "db.sqlite3")
    else:
        unreachable["PORT"] = "1"
    monkeypatch.setitem(connections.settings, "default", unreachable)


def test_with_the_database_unreachable_the_peer_gets_out_of_resources(
    listener, monkeypatch, storage_dir
):
    assoc = scu().associate("127.0.0.1", listener)
    database_unreachable(monkeypatch, storage_dir)

    status = assoc.send_c_store(make_dataset())
    assoc.release()

    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert status.ErrorComment == "database unavailable"
    assert not [p for p in storage_dir.rglob("*") if p.is_file()]


def stored_files(storage_dir: Path) -> list[Path]:
    """Every file stored under its final name (not the listener's incoming files)."""
    return sorted(p for p in storage_dir.rglob("*") if p.is_file() and ".incoming" not in p.parts)


def test_an_instance_of_a_known_series_is_not_kept_when_its_row_cannot_be_written(
    listener, monkeypatch, storage_dir
):
    """When the rows cannot be written the new file is not kept, and what was stored before
    stays as it was."""
    first = make_dataset()
    second = make_dataset(
        StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID
    )
    assoc = scu().associate("127.0.0.1", listener)
    assert assoc.send_c_store(first).Status == 0x0000
    before = stored_files(storage_dir)
    database_unreachable(monkeypatch, storage_dir)
    assoc.release()
    assoc = scu().associate("127.0.0.1", listener)

    status = assoc.send_c_store(second)
    assoc.release()

    assert status.Status == STATUS_OUT_OF_RESOURCES
    assert stored_files(storage_dir) == before
    monkeypatch.undo()
    assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [
        first.SOPInstanceUID
    ]


def test_patient_identifiers_never_reach_the_logs(listener, caplog, settings):
    settings.DICOM_ACCEPT_ALL = False  # the rejection is logged too
    ds = make_dataset(PatientID="PID-SECRET-123", PatientName="Doe^Jane", AccessionNumber="A-777")
    caplog.set_level("DEBUG")

    stranger = scu(ae_title="STRANGER").associate("127.0.0.1", listener)
    settings.DICOM_ACCEPT_ALL = True
    assoc = scu().associate("127.0.0.1", listener)
    assert assoc.send_c_store(ds).Status == 0x0000
    del ds.SeriesInstanceUID
    assert assoc.send_c_store(ds).Status != 0x0000
    assoc.release()

    assert stranger.is_rejected
    assert "stored an instance" in caplog.text
    assert "1 stored, 1 failed" in caplog.text  # the association's summary
    for identifier in ("PID-SECRET-123", "Doe", "Jane", "A-777"):
        assert identifier not in caplog.text
