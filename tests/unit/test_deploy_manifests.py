"""The Kubernetes manifests under deploy/kubernetes/ hold together, offline.

Each manifest is checked against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields
are errors) for the oldest and newest API version we claim, and against the node itself: container
arguments parse with our own CLI, the ConfigMap's node.yaml loads with our settings model, probes reach
/healthz and /readyz on the port the config listens on, names of volumes, claims, Secrets and images
agree, the spool is ReadWriteMany and mounted where the config puts it, and infer workers get a GPU.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from dicom_ai_node import __version__
from dicom_ai_node.api.security import host_allowed
from dicom_ai_node.cli import app
from dicom_ai_node.config import NodeSettings, load_settings
from dicom_ai_node.devtools.repo import ROOT
from dicom_ai_node.domain.jobs import JobKind, QueueStats
from dicom_ai_node.metrics import NodeMetrics

KUBE_DIR = ROOT / "deploy" / "kubernetes"
# Oldest Kubernetes still widely run in hospitals' clusters, and the newest schema the package knows.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
IMAGES = {f"dicom-ai-node:{__version__}", f"dicom-ai-node-cuda:{__version__}"}
CONFIG_PATH = "/etc/dicom-ai-node/node.yaml"
GPU = "nvidia.com/gpu"
SCALE_OUT_DOC = ROOT / "docs" / "operations" / "scale-out.md"

Doc = dict[str, Any]


def _kustomization() -> Doc:
    data: Doc = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    return data


def _manifests() -> list[tuple[str, Doc]]:
    found: list[tuple[str, Doc]] = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((KUBE_DIR / name).read_text()):
            if doc:
                found.append((name, doc))
    return found


MANIFESTS = _manifests()


def _of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def _named(kind: str, name: str) -> Doc:
    matches = [doc for doc in _of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _workloads() -> list[Doc]:
    """Deployments and Jobs: everything that runs a pod."""
    return _of_kind("Deployment") + _of_kind("Job")


def _pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _containers(workload: Doc) -> list[Doc]:
    containers: list[Doc] = _pod_spec(workload)["containers"]
    return containers


def _all_containers() -> Iterator[tuple[Doc, Doc]]:
    for workload in _workloads():
        for container in _containers(workload):
            yield workload, container


def _cli(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse `dicom-ai-node ARGS` with the node's own CLI without running it: (command path, options).

    Raises the CLI's UsageError (NoSuchOption, BadParameter, ...) for anything it would refuse."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("dicom-ai-node", list(args))
    path: list[str] = []
    while hasattr(cmd, "resolve_command"):  # a group: the first remaining word names the subcommand
        # typer's own Group.invoke reads the subcommand back from _protected_args in the same way.
        name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert name is not None and sub is not None
        path.append(name)
        cmd = sub
        ctx = cmd.make_context(name, rest, parent=ctx)
    return path, dict(ctx.params)


def _node_settings(tmp_path: Path) -> NodeSettings:
    text = _named("ConfigMap", "dicom-ai-node-config")["data"]["node.yaml"]
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return load_settings(path, base_dir=tmp_path)


def _port(container: Doc, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
    assert name_or_number in ports, f"{container['name']}: no port named {name_or_number!r}"
    return ports[name_or_number]


def _component(workload: Doc) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def test_kustomization_lists_every_manifest_file() -> None:
    listed = _kustomization()["resources"]
    on_disk = sorted(p.name for p in KUBE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    kinds = sorted({doc["kind"] for _, doc in MANIFESTS})
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "ConfigMap", "Secret"} <= set(kinds)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version: str) -> None:
    problems = []
    for name, doc in MANIFESTS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """The validator is strict: a typo in a probe would otherwise be dropped silently by the API server."""
    doc = yaml.safe_load((KUBE_DIR / "receiver-deployment.yaml").read_text())
    _containers(doc)[0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_container_arguments_are_options_of_our_cli() -> None:
    commands: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for workload, container in _all_containers():
        assert container["command"] == ["dicom-ai-node"], container["name"]
        path, params = _cli([str(a) for a in container["args"]])
        assert str(params["config"]) == CONFIG_PATH, container["name"]
        commands[_component(workload)] = (path, params)

    path, params = commands["receiver"]
    assert path == ["serve"] and params["workers"] is False and params["http"] is True
    path, params = commands["worker-infer"]
    assert path == ["worker"] and params["kind"] == [JobKind.INFER]
    path, params = commands["worker-deliver"]
    assert path == ["worker"] and set(params["kind"]) == {JobKind.DELIVER, JobKind.PULL}
    assert commands["migration"][0] == ["db", "upgrade"]
    # Every job kind has a worker somewhere.
    kinds = {k for c in ("worker-infer", "worker-deliver") for k in commands[c][1]["kind"]}
    assert kinds == set(JobKind)


def test_the_cli_check_refuses_an_option_that_does_not_exist() -> None:
    with pytest.raises(typer.BadParameter):
        _cli(["worker", "--kind", "gpu"])
    # typer exports no UsageError of its own; BadParameter's base class is the one NoSuchOption shares.
    usage_error = typer.BadParameter.__mro__[1]
    with pytest.raises(usage_error, match="--receive-only"):
        _cli(["serve", "--receive-only"])


def test_config_map_loads_with_the_node_settings(tmp_path: Path) -> None:
    settings = _node_settings(tmp_path)
    # Only the migration Job changes the schema; pods refuse an out-of-date one.
    assert settings.auto_upgrade_schema is False
    assert settings.dicom.bind == "0.0.0.0" and settings.http.bind == "0.0.0.0"
    assert settings.rules_file == Path("/etc/dicom-ai-node/rules.yaml")
    # Prometheus scrapes each receiver by its pod DNS name in the kustomization's namespace.
    pod_name = f"10-1-2-3.{_kustomization()['namespace']}.pod.cluster.local"
    assert host_allowed(pod_name, settings.http.effective_allowed_hosts())
    # The database URL is not in the file: it comes from the Secret.
    assert "database_url" not in yaml.safe_load(
        _named("ConfigMap", "dicom-ai-node-config")["data"]["node.yaml"]
    )


def test_probes_reach_healthz_and_readyz_on_the_http_port(tmp_path: Path) -> None:
    settings = _node_settings(tmp_path)
    receiver = _named("Deployment", "dicom-ai-node-receiver")
    (container,) = _containers(receiver)
    assert _port(container, "http") == settings.http.port
    assert _port(container, "dicom") == settings.dicom.port
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(container, get["port"]) == settings.http.port, probe
        assert get.get("scheme", "HTTP") == ("HTTPS" if settings.http.tls else "HTTP")


def test_worker_liveness_reads_the_metrics_port_the_worker_opens() -> None:
    for workload in _of_kind("Deployment"):
        if not _component(workload).startswith("worker"):
            continue
        (container,) = _containers(workload)
        _, params = _cli([str(a) for a in container["args"]])
        assert params["metrics_bind"] == "0.0.0.0"  # the kubelet and Prometheus come from outside the pod
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/metrics"
        assert _port(container, probe["port"]) == params["metrics_port"]


def test_services_select_receivers_and_target_their_named_ports() -> None:
    receiver = _named("Deployment", "dicom-ai-node-receiver")
    labels = receiver["spec"]["template"]["metadata"]["labels"]
    (container,) = _containers(receiver)
    targets = set()
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            _port(container, port["targetPort"])
            targets.add(port["targetPort"])
    assert targets == {"dicom", "http"}
    dicom = _named("Service", "dicom-ai-node-dicom")
    # The allow-list (dicom.allowed_peers[].hosts) and per-IP limits need the sender's own address.
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"
    pdb = _named("PodDisruptionBudget", "dicom-ai-node-receiver")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_deployment_selectors_match_their_pod_labels() -> None:
    for workload in _of_kind("Deployment"):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_images_and_referenced_objects_exist() -> None:
    configmaps = {d["metadata"]["name"] for d in _of_kind("ConfigMap")}
    claims = {d["metadata"]["name"] for d in _of_kind("PersistentVolumeClaim")}
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in _of_kind("Secret")
    }
    accounts = {d["metadata"]["name"] for d in _of_kind("ServiceAccount")}
    for workload in _workloads():
        pod = _pod_spec(workload)
        assert pod["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in _containers(workload):
            assert container["image"] in IMAGES, container["image"]
            mounts = container["volumeMounts"]
            assert {m["name"] for m in mounts} <= volumes.keys()
            assert {m["name"] for m in mounts} == volumes.keys(), "a volume nobody mounts"
            config = [m for m in mounts if m["mountPath"] == CONFIG_PATH]
            assert len(config) == 1 and config[0]["readOnly"] is True
            env = {e["name"]: e for e in container["env"]}
            ref = env["AINODE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]
    # The CUDA image for the GPU pools, the plain one elsewhere (the same Dockerfile, another torch wheel).
    for workload, container in _all_containers():
        cuda = container["image"].startswith("dicom-ai-node-cuda:")
        assert cuda == (_component(workload) == "worker-infer"), container["name"]


def test_spool_is_one_read_write_many_claim_mounted_where_the_config_puts_it(tmp_path: Path) -> None:
    settings = _node_settings(tmp_path)
    (claim,) = _of_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spool_users = set()
    for workload in _of_kind("Deployment"):
        pod = _pod_spec(workload)
        spool = [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] in spool] == [
            claim["metadata"]["name"]
        ]
        (container,) = _containers(workload)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] in spool]
        assert Path(mount["mountPath"]) == settings.spool_dir
        assert not mount.get("readOnly", False)
        spool_users.add(_component(workload))
    assert spool_users == {"receiver", "worker-infer", "worker-deliver"}


def test_infer_workers_get_a_gpu_and_nothing_else_does() -> None:
    for workload in _of_kind("Deployment"):
        (container,) = _containers(workload)
        resources = container["resources"]
        if _component(workload) == "worker-infer":
            assert int(resources["requests"][GPU]) == int(resources["limits"][GPU]) == 1
            pod = _pod_spec(workload)
            assert pod.get("nodeSelector") or pod.get("affinity"), "a GPU pool is picked by node labels"
            assert any(t["key"] == GPU for t in pod["tolerations"])
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env.get("AINODE_MODELS__DEVICE") == "cuda"
            # The inference process gets its volumes through /dev/shm: more than the runtime's 64 MB.
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert [m["mountPath"] for m in container["volumeMounts"] if m["name"] == shm[0]["name"]] == [
                "/dev/shm"
            ]
        else:
            assert GPU not in resources.get("requests", {}) and GPU not in resources.get("limits", {})


def test_pods_run_non_root_read_only_without_capabilities_and_with_resource_requests() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for workload in _workloads():
        pod = _pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert f"--uid {security['runAsUser']}" in dockerfile  # the image's own user
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v}
        for container in _containers(workload):
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False
            assert c["readOnlyRootFilesystem"] is True
            assert c["capabilities"]["drop"] == ["ALL"] and "add" not in c["capabilities"]
            # A read-only root still needs a writable /tmp (temp files, MONAI bundles).
            assert any(m["mountPath"] == "/tmp" and m["name"] in writable for m in container["volumeMounts"])
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= requests.keys() and "memory" in limits
            assert all(p["containerPort"] > 1024 for p in container.get("ports", []))  # no NET_BIND_SERVICE


def test_migration_job_runs_db_upgrade_once() -> None:
    (job,) = _of_kind("Job")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    (container,) = _containers(job)
    assert _cli([str(a) for a in container["args"]])[0] == ["db", "upgrade"]


def test_scale_out_doc_names_only_metrics_the_node_exports() -> None:
    metrics = NodeMetrics(
        job_counts=lambda: {"infer/queued": 0}, queue_stats=lambda: {"infer": QueueStats(0, 0.0)}
    )
    exported: set[str] = set()
    for family in metrics.registry.collect():
        # A labelled counter shows no sample before its first label set: its exposed name is name_total.
        exported.add(f"{family.name}_total" if family.type == "counter" else family.name)
    named = set(re.findall(r"\bainode_[a-z_]+[a-z]", SCALE_OUT_DOC.read_text()))
    assert len(named) >= 10
    assert named <= exported, sorted(named - exported)


def test_scale_out_doc_commands_are_real() -> None:
    commands = re.findall(r"`dicom-ai-node ([^`]+)`", SCALE_OUT_DOC.read_text())
    assert len(commands) >= 4
    for command in commands:
        _cli(shlex.split(command))
