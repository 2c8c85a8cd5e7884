"""A real Orthanc wired to a running node: Orthanc forwards stable series to the node, the node sends its
results back to Orthanc. For the demo, e2e tests and the turnaround benchmark."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.ports import free_port


@contextmanager
def orthanc_with_node(
    workdir: Path,
    *,
    stable_age: int = 2,
    node_extra: Callable[[OrthancServer], dict[str, Any]] | None = None,
    **node_options: Any,
) -> Iterator[tuple[OrthancServer, NodeProcess]]:
    """Start Orthanc (auto-forward to the node's port) and the node (destination `pacs` = Orthanc).

    `node_extra(orthanc)` adds node config that needs Orthanc's addresses (e.g. a DICOMweb destination);
    other keyword arguments go to NodeProcess. Both are stopped on exit.
    """
    node_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc").start("AINODE", node_port, stable_age=stable_age)
    node: NodeProcess | None = None
    try:
        node = NodeProcess(
            workdir / "node",
            pacs_aet=orthanc.aet,
            pacs_port=orthanc.dicom_port,
            dicom_port=node_port,
            extra=node_extra(orthanc) if node_extra else None,
            **node_options,
        )
        node.start()
        yield orthanc, node
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
