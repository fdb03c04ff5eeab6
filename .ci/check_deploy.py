"""Cross-checks of the rendered overlays, skaffold.yaml and the Dockerfile that schemas cannot express.

Usage: python .ci/check_deploy.py RENDERED_DIR, where RENDERED_DIR holds development.yaml and
production.yaml from `kubectl kustomize`. Prints every problem and exits 1 if there is any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import load_settings  # noqa: E402 - the repository root is on the path only now

SKAFFOLD_API = "skaffold/v4beta14"  # the newest schema the skaffold repository publishes (skaffold v2.19.0)
SECRET_KEYS = {"QUEUE_DB_URI", "USER_PORTFOLIO_DB_URI", "API_TOKEN"}
# The Secret whose key holds the named tokens, mounted as the file API_TOKENS_FILE names (production).
TOKENS_SECRET, TOKENS_KEY = "consistency-manager-svc-tokens", "tokens"
SKAFFOLD_KEYS = {
    "apiVersion", "kind", "metadata", "requires", "build", "test", "manifests", "deploy",
    "portForward", "resourceSelector", "verify", "customActions", "profiles",
}  # fmt: skip
VERIFY_KEYS = {"name", "timeout", "container", "executionMode"}
VERIFY_CONTAINER_KEYS = {"name", "image", "command", "args", "env"}


class _Recorder(dict):
    """An empty environment that notes every variable read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """Note the name; every variable is unset."""
        self.read.add(key)
        return default


def settings_read() -> set[str]:
    """Return the names of every variable config.py reads."""
    env = _Recorder()
    load_settings(env)
    return env.read


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group rendered resources by kind."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def check_overlay(name: str, docs: list[dict[str, Any]]) -> list[str]:
    """Return the problems of one rendered overlay."""
    problems: list[str] = []
    kinds = by_kind(docs)
    for kind in ("Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"):
        if len(kinds.get(kind, [])) != 1:
            problems.append(f"{name}: expected one {kind}, found {len(kinds.get(kind, []))}")
    if problems:
        return problems
    pod = kinds["Deployment"][0]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    config = kinds["ConfigMap"][0]["data"]
    problems += check_config(name, config)
    problems += check_credentials(name, container, kinds.get("Secret", []))
    problems += check_pod(name, pod, container)
    problems += check_tokens_file(name, pod, container, config)
    if kinds["ServiceAccount"][0].get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: the ServiceAccount must not automount its token")
    problems += check_network(name, kinds["NetworkPolicy"][0], kinds["Service"][0], container)
    replicas = kinds["Deployment"][0]["spec"]["replicas"]
    if name == "development":
        if replicas != 1 or config.get("LOG_LEVEL") != "DEBUG" or float(config["POLLING_INTERVAL"]) >= 30:
            problems.append("development: wants 1 replica, LOG_LEVEL=DEBUG and a POLLING_INTERVAL under 30")
    else:
        terms = pod["spec"].get("affinity", {}).get("podAntiAffinity", {})
        spread = terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        if replicas < 2 or not any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname" for t in spread):
            problems.append("production: wants 2+ replicas and preferred anti-affinity by hostname")
    return problems


def check_config(name: str, config: dict[str, str]) -> list[str]:
    """The ConfigMap: only names the service reads, no credential, JSON logs."""
    problems = []
    unknown = set(config) - settings_read()
    if unknown:
        problems.append(f"{name}: the ConfigMap sets names config.py does not read: {sorted(unknown)}")
    if set(config) & SECRET_KEYS:
        problems.append(f"{name}: credentials in the ConfigMap: {sorted(set(config) & SECRET_KEYS)}")
    if config.get("LOG_FORMAT") != "json":
        problems.append(f"{name}: LOG_FORMAT must be json")
    return problems


def check_credentials(name: str, container: dict[str, Any], secrets: list[dict[str, Any]]) -> list[str]:
    """Credentials: from one Secret by secretKeyRef; generated in development, external in production."""
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}
    if set(refs) != SECRET_KEYS or any(r["key"] != key for key, r in refs.items()):
        return [f"{name}: {sorted(SECRET_KEYS)} must each come from the Secret key of the same name"]
    secret_names = {r["name"] for r in refs.values()}
    rendered = {s["metadata"]["name"]: s for s in secrets}
    if name == "development":
        if len(secret_names) != 1 or not secret_names <= set(rendered):
            return ["development: the credentials must come from the generated Secret"]
        if set(rendered[secret_names.pop()]["data"]) != SECRET_KEYS:
            return [f"development: the generated Secret must hold exactly {sorted(SECRET_KEYS)}"]
    elif secrets:
        return ["production: the Secret is managed outside the manifests and must not be rendered"]
    return []


def check_tokens_file(name: str, pod: dict[str, Any], container: dict[str, Any], config: dict[str, str]) -> list[str]:
    """API_TOKENS_FILE (required in production) is a key of the tokens Secret, in a volume kubelet keeps up to date."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = env.get("API_TOKENS_FILE") or config.get("API_TOKENS_FILE")
    if path is None:
        return ["production: API_TOKENS_FILE must be set"] if name == "production" else []
    folder, _, file = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == folder]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    secret = volumes.get(mounts[0]["name"], {}).get("secret", {}) if len(mounts) == 1 else {}
    keys = {item["path"]: item["key"] for item in secret.get("items", [])} or {file: file}
    # A subPath mount never sees the Secret's updates: the file would not rotate.
    if len(mounts) != 1 or mounts[0].get("subPath") or not mounts[0].get("readOnly") or not secret:
        return [f"{name}: API_TOKENS_FILE {path} must be in a read-only Secret volume mounted whole, without subPath"]
    if (secret["secretName"], keys.get(file)) != (TOKENS_SECRET, TOKENS_KEY):
        return [f"{name}: API_TOKENS_FILE {path} must be the key {TOKENS_KEY} of the Secret {TOKENS_SECRET}"]
    return []


def check_pod(name: str, pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Probes, resources, scrape annotations and the security context."""
    problems = []
    annotations = pod["metadata"].get("annotations", {})
    wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    if any(annotations.get(k) != v for k, v in wanted.items()):
        problems.append(f"{name}: the pod template needs the Prometheus scrape annotations {wanted}")
    probes = {p: container.get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")}
    if probes != {"livenessProbe": "/health", "readinessProbe": "/ready"}:
        problems.append(f"{name}: probes must be /health (liveness) and /ready (readiness), not {probes}")
    resources = container.get("resources", {})
    if not all(resources.get(part, {}).get(r) for part in ("requests", "limits") for r in ("cpu", "memory")):
        problems.append(f"{name}: cpu and memory requests and limits are required")
    uid = int(re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1))
    pod_sc, sc = pod["spec"]["securityContext"], container["securityContext"]
    wants = [
        pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True,
        pod_sc.get("runAsUser") == sc.get("runAsUser") == uid,
        sc.get("readOnlyRootFilesystem") is True,
        sc.get("allowPrivilegeEscalation") is False,
        sc.get("capabilities", {}).get("drop") == ["ALL"],
        pod_sc.get("seccompProfile", {}).get("type") == sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
    ]
    if not all(wants):
        problems.append(f"{name}: the security context falls short (uid {uid}): {wants}")
    return problems


def check_network(name: str, policy: dict[str, Any], service: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The Service reaches the container's port 8080; the NetworkPolicy allows 8080 in, 5432 and DNS out."""
    problems = []
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if [(p["port"], ports.get(p["targetPort"])) for p in service["spec"]["ports"]] != [(8080, 8080)]:
        problems.append(f"{name}: the Service must send port 8080 to the container's port 8080")
    spec = policy["spec"]
    ingress = {(p["port"], p["protocol"]) for rule in spec.get("ingress", []) for p in rule.get("ports", [])}
    egress = {(p["port"], p["protocol"]) for rule in spec.get("egress", []) for p in rule.get("ports", [])}
    if sorted(spec.get("policyTypes", [])) != ["Egress", "Ingress"] or ingress != {(8080, "TCP")}:
        problems.append(f"{name}: the NetworkPolicy must govern both directions and let in 8080/TCP only")
    if egress != {(5432, "TCP"), (53, "UDP"), (53, "TCP")}:
        problems.append(f"{name}: the NetworkPolicy must let out 5432/TCP and DNS (53 UDP and TCP) only")
    return problems


def check_skaffold(image: str) -> list[str]:
    """skaffold.yaml: schema version, known keys, the image, and profiles mapped to existing overlays."""
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    problems = []
    if config.get("apiVersion") != SKAFFOLD_API or config.get("kind") != "Config":
        problems.append(f"skaffold.yaml: want apiVersion {SKAFFOLD_API} and kind Config")
    if set(config) - SKAFFOLD_KEYS:
        problems.append(f"skaffold.yaml: unknown top-level keys {sorted(set(config) - SKAFFOLD_KEYS)}")
    artifacts = config["build"]["artifacts"]
    dockerfile = ROOT / artifacts[0].get("context", ".") / artifacts[0]["docker"]["dockerfile"]
    if [a["image"] for a in artifacts] != [image] or not dockerfile.is_file():
        problems.append(f"skaffold.yaml: must build the Deployment's image {image} from the Dockerfile")
    profiles = {p["name"]: p["manifests"]["kustomize"]["paths"] for p in config.get("profiles", [])}
    if profiles != {n: [f"k8s/overlays/{n}"] for n in ("development", "production")}:
        problems.append(f"skaffold.yaml: profiles must map to the overlays, not {profiles}")
    paths = config["manifests"]["kustomize"]["paths"] + [p for ps in profiles.values() for p in ps]
    problems += [
        f"skaffold.yaml: no kustomization in {p}" for p in paths if not (ROOT / p / "kustomization.yaml").is_file()
    ]
    for case in config.get("verify", []):
        if set(case) - VERIFY_KEYS or set(case["container"]) - VERIFY_CONTAINER_KEYS or "name" not in case:
            problems.append(f"skaffold.yaml: verify case {case.get('name')} has unknown keys")
    if not config.get("verify"):
        problems.append("skaffold.yaml: wants a verify stage")
    return problems


def check_dockerfile() -> list[str]:
    """The base image is python:3.11 slim bookworm, pinned to a patch release, in every stage."""
    bases = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not bases or not all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", b) for b in bases):
        return [f"Dockerfile: want python:3.11.N-slim-bookworm bases, not {bases}"]
    return []


def main(rendered: Path) -> int:
    """Run every check; print the problems; return the exit status."""
    problems = check_dockerfile()
    image = ""
    for name in ("development", "production"):
        docs = [d for d in yaml.safe_load_all((rendered / f"{name}.yaml").read_text()) if d]
        problems += check_overlay(name, docs)
        image = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    problems += check_skaffold(image)
    for problem in problems:
        print(f"deploy check: {problem}", file=sys.stderr)
    print(f"deploy checks: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
