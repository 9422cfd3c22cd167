"""The Kubernetes manifests (``packaging/kubernetes``), rendered and read against their claims.

No cluster runs here: ``kubectl kustomize`` renders every overlay offline (``scripts/test``
installs Debian's ``kubernetes-client`` when no kubectl is there), ``kubernetes-validate``
checks every object against the API schemas of each targeted Kubernetes version, and the
assertions below read the rendered objects, as a reviewer would:

- no Secret reaches a supervisor container: only the refresher mounts the supervisor keys,
  only the server's containers mount theirs, and no pod gets a service-account token;
- every container runs with a read-only root, all capabilities dropped (the supervisor adds
  back exactly its systemd unit's), as non-root and with the runtime's seccomp profile except
  where :data:`EXCEPTIONS` says why not;
- the NetworkPolicies deny by default and let only supervisors reach the server, and only the
  server (and its db-upgrade Job) reach the database;
- the database URL reaches the server as a file, never as an environment value;
- every image named is the one ``packaging/image/build-image`` builds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from docker_kit import strict

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "packaging" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
UNIT = ROOT / "packaging" / "systemd" / "privsep-supervisor.service"
# The versions docs/deployment.md names as targeted.
TARGETED = ("1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0")
WORKLOADS = ("Deployment", "DaemonSet", "Job", "StatefulSet", "CronJob", "Pod", "ReplicaSet")

SERVER = "Deployment/privsep-server"
SUPERVISOR = "DaemonSet/privsep-supervisor"
JOB = "Job/privsep-db-upgrade"
# Which containers may hold which Secret, and nothing else may hold any.
SECRETS_ALLOWED = {
    (SERVER, "server"): {"privsep-server", "privsep-signing-keys"},
    (JOB, "db-upgrade"): {"privsep-server"},
    (SUPERVISOR, "token-refresher"): {"privsep-supervisor-keys"},
}
# The containers that cannot have a setting, and why (docs/deployment.md says the same).
EXCEPTIONS = {
    "runAsNonRoot": {
        (SUPERVISOR, "supervisor"): "the drop to a pool uid, the sandbox's mounts and cgroups "
        "work from uid 0 only",
    },
    "allowPrivilegeEscalation": {
        (SUPERVISOR, "supervisor"): "the API refuses allowPrivilegeEscalation: false next to "
        "CAP_SYS_ADMIN; each sandbox sets no_new_privs itself",
    },
    "seccompRuntimeDefault": {
        (SUPERVISOR, "supervisor"): "the runtime's default profile refuses pivot_root, which "
        "every sandbox needs",
    },
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        why = "kubectl is not installed (apt-get install kubernetes-client; scripts/test does)"
        if strict():
            pytest.fail(f"PRIVSEP_TESTS_STRICT=1 and the manifests cannot be rendered: {why}")
        pytest.skip(why)
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def by_ref(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {ref(o): o for o in objects}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "Pod":
        return dict(spec)
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return dict(obj["metadata"].get("labels", {}))
    return dict(obj["spec"]["template"]["metadata"].get("labels", {}))


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in WORKLOADS)


def containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, its pod spec, container) for every container and init container."""
    for obj in workloads(objects):
        spec = pod_spec(obj)
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield ref(obj), spec, container


def secrets_of(spec: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """The Secrets a container can read: mounted volumes (plain or projected) and env."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    found: set[str] = set()
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            found.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                found.add(source["secret"]["name"])
            if "serviceAccountToken" in source:
                found.add("<service-account-token>")
    for env in container.get("env", []):
        secret_ref = env.get("valueFrom", {}).get("secretKeyRef")
        if secret_ref:
            found.add(secret_ref["name"])
    for env_from in container.get("envFrom", []):
        if "secretRef" in env_from:
            found.add(env_from["secretRef"]["name"])
    return found


def effective(spec: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    if key in own:
        return own[key]
    return spec.get("securityContext", {}).get(key)


def unit_capabilities() -> set[str]:
    line = next(
        line for line in UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet=")
    )
    return {cap.removeprefix("CAP_") for cap in line.split("=", 1)[1].split()}


# --- rendering and schemas ------------------------------------------------------------------


def test_every_overlay_renders_and_validates_against_the_targeted_versions(
    objects: list[dict[str, Any]],
) -> None:
    import kubernetes_validate

    assert objects
    for version in TARGETED:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{ref(obj)} is invalid for Kubernetes {version}: {exc}"
                ) from None


def test_the_components_are_there(objects: list[dict[str, Any]]) -> None:
    found = by_ref(objects)
    server = found[SERVER]
    assert server["spec"]["replicas"] >= 2
    main = next(c for c in pod_spec(server)["containers"] if c["name"] == "server")
    for probe in ("readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] == "/v1/health", probe
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert any(
        p["spec"]["selector"]["matchLabels"].items() <= pod_labels(server).items()
        and p["spec"].get("minAvailable", 0) >= 1
        for p in pdbs
    ), pdbs
    job = next(c for c in pod_spec(found[JOB])["containers"])
    assert job["args"][-2:] == ["db", "upgrade"]
    pair = pod_spec(found[SUPERVISOR])
    names = {c["name"]: c for c in pair["containers"]}
    assert names["supervisor"]["args"] == ["supervisor"]
    assert names["token-refresher"]["args"][-1] == "token-refresher"
    # They share one in-memory emptyDir, the session token's.
    volumes = {v["name"]: v for v in pair["volumes"]}
    shared = {m["name"] for m in names["supervisor"]["volumeMounts"]} & {
        m["name"] for m in names["token-refresher"]["volumeMounts"]
    }
    shared = {n for n in shared if "emptyDir" in volumes[n]}
    assert shared == {"session"}, shared
    assert volumes["session"]["emptyDir"]["medium"] == "Memory"


# --- secrets ---------------------------------------------------------------------------------


def test_no_secret_reaches_a_container_that_is_not_allowed_one(
    objects: list[dict[str, Any]],
) -> None:
    held = {(workload, c["name"]): secrets_of(spec, c) for workload, spec, c in containers(objects)}
    for key, secrets in held.items():
        assert secrets <= SECRETS_ALLOWED.get(key, set()), (key, secrets)
    assert held[(SUPERVISOR, "supervisor")] == set()
    # The refresher mounts only its own node's key.
    refresher = next(
        c for w, _, c in containers(objects) if (w, c["name"]) == (SUPERVISOR, "token-refresher")
    )
    key_mount = next(m for m in refresher["volumeMounts"] if m["name"] == "supervisor-keys")
    assert key_mount["subPathExpr"] == "$(NODE_NAME)"


def test_no_pod_gets_a_service_account_token(objects: list[dict[str, Any]]) -> None:
    for obj in workloads(objects):
        assert pod_spec(obj).get("automountServiceAccountToken") is False, ref(obj)
    for account in (o for o in objects if o["kind"] == "ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False, ref(account)


def test_private_copies_stay_with_the_container_that_made_them(
    objects: list[dict[str, Any]],
) -> None:
    """privsep-install-secrets writes each copy into a volume that no other container of the
    pod mounts: the refresher's key never lands in the supervisor's view (not even in the
    session volume they share)."""
    for workload, spec, container in containers(objects):
        command = container.get("command", [])
        if not command or command[0] != "privsep-install-secrets":
            continue
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        others = {
            m["name"]
            for c in spec["containers"] + spec.get("initContainers", [])
            if c is not container
            for m in c.get("volumeMounts", [])
        }
        for pair in command[1 : command.index("--")]:
            dest = pair.split("=", 1)[0]
            volume = next(
                name for path, name in mounts.items() if dest.startswith(path.rstrip("/") + "/")
            )
            assert volume not in others, (workload, container["name"], dest, volume)
            kind = next(v for v in spec["volumes"] if v["name"] == volume)
            assert kind.get("emptyDir", {}).get("medium") == "Memory", (workload, volume)


def test_the_database_url_is_a_file_never_an_environment_value(
    objects: list[dict[str, Any]],
) -> None:
    found = by_ref(objects)
    config = tomllib.loads(found["ConfigMap/privsep-server-config"]["data"]["server.toml"])
    assert "url" not in config["database"]
    url_file = config["database"]["url_file"]
    for workload in (SERVER, JOB):
        container = pod_spec(found[workload])["containers"][0]
        command = container["command"]
        dests = [pair.split("=", 1)[0] for pair in command[1 : command.index("--")]]
        assert any(url_file == d or url_file.startswith(d + "/") for d in dests), (workload, dests)
    for _, _, container in containers(objects):
        for env in container.get("env", []):
            assert not re.match(r"PRIVSEP__DATABASE__URL$", env["name"]), container["name"]
            assert "postgres" not in str(env.get("value", "")), container["name"]


# --- hardening -------------------------------------------------------------------------------


def test_every_container_is_hardened(objects: list[dict[str, Any]]) -> None:
    caps = unit_capabilities()
    assert len(caps) == 9, caps
    for workload, spec, container in containers(objects):
        key = (workload, container["name"])
        context = container.get("securityContext", {})
        assert context.get("readOnlyRootFilesystem") is True, key
        assert context.get("capabilities", {}).get("drop") == ["ALL"], key
        added = set(context.get("capabilities", {}).get("add", []))
        assert added == (caps if key == (SUPERVISOR, "supervisor") else set()), (key, added)
        checks = {
            "runAsNonRoot": effective(spec, container, "runAsNonRoot") is True,
            "allowPrivilegeEscalation": context.get("allowPrivilegeEscalation") is False,
            "seccompRuntimeDefault": (effective(spec, container, "seccompProfile") or {}).get(
                "type"
            )
            == "RuntimeDefault",
        }
        for setting, ok in checks.items():
            excepted = key in EXCEPTIONS[setting]
            assert ok != excepted, f"{key}: {setting} is {'set' if ok else 'not set'}" + (
                f", but listed as an exception ({EXCEPTIONS[setting][key]})" if excepted else ""
            )
        if not checks["runAsNonRoot"]:
            continue
        uid = effective(spec, container, "runAsUser")
        assert uid is not None and uid != 0, key


def test_images_are_the_ones_the_build_makes(objects: list[dict[str, Any]]) -> None:
    done = subprocess.run(
        [str(ROOT / "packaging" / "image" / "build-image"), "--tag"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip()
    images = {c["image"] for _, _, c in containers(objects)}
    assert images == {tag}, images


# --- network policies ------------------------------------------------------------------------

DATABASE = "database"
EXTERNAL_DB = "external-database"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector, "extend selects() for matchExpressions"
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


def peer_matches(peer: dict[str, Any], labels: dict[str, str] | None) -> bool:
    """Whether a policy peer admits this pod (labels in the namespace), or the external
    database (labels None) through an ipBlock."""
    if labels is None:
        return "ipBlock" in peer
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return False
    return selects(peer["podSelector"], labels)


def rule_allows(rule: dict[str, Any], side: str, labels: dict[str, str] | None, port: int) -> bool:
    peers = rule.get(side)
    ports = rule.get("ports")
    peer_ok = peers is None or any(peer_matches(p, labels) for p in peers)
    port_ok = ports is None or any(p.get("port") == port for p in ports)
    return peer_ok and port_ok


def allowed(
    policies: list[dict[str, Any]],
    src: dict[str, str],
    dst: dict[str, str] | None,
    port: int,
) -> bool:
    """NetworkPolicy semantics for a connection from pod ``src`` to pod ``dst`` (or to the
    external database, ``None``): egress allowed by a policy selecting ``src``, and ingress
    allowed by one selecting ``dst`` (an external peer has no ingress policy here). A pod no
    policy of a direction selects is open in that direction."""

    def side_ok(pod: dict[str, str], direction: str, other: dict[str, str] | None) -> bool:
        mine = [
            p
            for p in policies
            if direction.capitalize() in p["spec"].get("policyTypes", [])
            and selects(p["spec"]["podSelector"], pod)
        ]
        if not mine:
            return True
        side = "to" if direction == "egress" else "from"
        return any(
            rule_allows(rule, side, other, port)
            for p in mine
            for rule in p["spec"].get(direction, [])
        )

    return side_ok(src, "egress", dst) and (dst is None or side_ok(dst, "ingress", src))


def test_network_policies_admit_only_what_each_component_needs(
    objects: list[dict[str, Any]],
) -> None:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny NetworkPolicy"
    found = by_ref(objects)
    pods = {
        "server": pod_labels(found[SERVER]),
        "supervisor": pod_labels(found[SUPERVISOR]),
        "db-upgrade": pod_labels(found[JOB]),
        DATABASE: {"app.kubernetes.io/component": "database"},
        "other": {"app": "something-else"},
    }
    # Where this overlay puts the database: a pod in the namespace or outside addresses.
    external = any(
        "ipBlock" in peer
        for p in policies
        for rule in p["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if any(port.get("port") == 5432 for port in rule.get("ports", []))
    )

    def db() -> dict[str, str] | None:
        return None if external else pods[DATABASE]

    for name, labels in pods.items():
        reaches_server = allowed(policies, labels, pods["server"], 8780)
        assert reaches_server == (name == "supervisor"), f"{name} -> server: {reaches_server}"
        if name == DATABASE:
            continue
        reaches_db = allowed(policies, labels, db(), 5432)
        assert reaches_db == (name in ("server", "db-upgrade")), f"{name} -> db: {reaches_db}"
        # Nothing reaches a supervisor.
        assert not allowed(policies, labels, pods["supervisor"], 8780), f"{name} -> supervisor"
    # The supervisor reaches nothing but the server (and DNS): not the database on any port.
    assert not allowed(policies, pods["supervisor"], db(), 5432)
    assert not allowed(policies, pods["supervisor"], None, 443)
