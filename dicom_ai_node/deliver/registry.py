"""Destinations by type: each can send files and say which SOP instances it now holds (read-back)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_ai_node.deliver import dimse, stowrs
from dicom_ai_node.deliver.dimse import DicomPeer, StoreReport
from dicom_ai_node.domain.peers import Destination
from dicom_ai_node.errors import PermanentDeliveryError


class Deliverer(Protocol):
    def send(self, paths: Sequence[Path]) -> StoreReport: ...

    def held(self, study_instance_uid: str, series_instance_uid: str) -> set[str]: ...

    def probe(self) -> str:
        """Check the destination answers (C-ECHO / a QIDO-RS query); returns what it said, raises
        DeliveryError when it does not answer or refuses."""
        ...


@dataclass(frozen=True)
class DimseDeliverer:
    peer: DicomPeer

    def send(self, paths: Sequence[Path]) -> StoreReport:
        return dimse.send_files(paths, self.peer)

    def held(self, study_instance_uid: str, series_instance_uid: str) -> set[str]:
        return dimse.find_sop_instances(self.peer, study_instance_uid, series_instance_uid)

    def probe(self) -> str:
        status = dimse.echo(self.peer)
        if status != 0:
            raise PermanentDeliveryError(f"C-ECHO {self.peer.ae_title}: status 0x{status:04X}")
        return f"C-ECHO {self.peer.ae_title}@{self.peer.host}:{self.peer.port}: status 0x0000"


@dataclass(frozen=True)
class DicomwebDeliverer:
    url: str
    timeout_s: float

    def send(self, paths: Sequence[Path]) -> StoreReport:
        return stowrs.store_instances(self.url, paths, self.timeout_s)

    def held(self, study_instance_uid: str, series_instance_uid: str) -> set[str]:
        return stowrs.find_sop_instances(self.url, study_instance_uid, series_instance_uid, self.timeout_s)

    def probe(self) -> str:
        return stowrs.probe(self.url, self.timeout_s)


def deliverer_for(destination: Destination, node_ae_title: str) -> Deliverer:
    if destination.type == "dicomweb":
        assert destination.url is not None  # guaranteed by Destination's validator
        return DicomwebDeliverer(destination.url, destination.timeout_s)
    assert destination.ae_title and destination.host and destination.port  # guaranteed by the validator
    return DimseDeliverer(
        DicomPeer(
            ae_title=destination.ae_title,
            host=destination.host,
            port=destination.port,
            calling_ae_title=destination.calling_ae_title or node_ae_title,
            max_pdu=destination.max_pdu,
            timeout_s=destination.timeout_s,
            tls=destination.tls,
        )
    )
