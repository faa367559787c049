"""The deployment files agree with the code they deploy (Docker is not on this machine, so nothing here
builds an image or starts a cluster; what can drift is checked instead).

    what                                  against
    every environment name a container    api.settings.Settings: a field (SWITCHBOARD_<NAME>) or an alias,
    gets (Dockerfile, compose, k8s)         and every value parses (Settings is built from them)
    ports                                 the serve command, EXPOSE, probes, upstreams, Service, published
    probe paths                           the routes of the application as built (make_app), probe-exempt
                                            from the Host check (api.middleware.PROBES)
    nginx's site in compose               rendered from the same template deploy/local.py renders, passes
                                            `nginx -t` (Debian's nginx), every NGINX_* name given
    the stop bounds                       SHUTDOWN_GRACE_S, UPLOAD_DRAIN_S, the writer's and the bus's
                                            drains, api.workers.DRAIN_S
    the autoscaler's metric               a family /metrics serves
    shared secrets                        the same on both compose nodes; node ids distinct
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from api.settings import Settings
from deploy import local

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
MANIFESTS = {doc["kind"]: doc for path in sorted(K8S.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc}
NODES = ("node-a", "node-b")
NOT_SETTINGS = {"PYTHONUNBUFFERED"}  # the interpreter's, not ours
SHARED = ("SWITCHBOARD_BLOB_SIGNING_KEY", "SWITCHBOARD_CALL_TOKEN_KEY", "SWITCHBOARD_ENCRYPTION_KEYS",
          "SWITCHBOARD_ENCRYPTION_KEY_ID", "SWITCHBOARD_METRICS_TOKEN", "SWITCHBOARD_DATABASE_APP_PASSWORD",
          "DATABASE_URL", "REDIS_URL", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
_INTERPOLATION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?]([^}]*))?\}")


def setting_names() -> set[str]:
    """Every environment name Settings reads: SWITCHBOARD_<field>, and each field's aliases."""
    names = set()
    for name, info in Settings.model_fields.items():
        names.add(f"SWITCHBOARD_{name.upper()}")
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(c) for c in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
    return names


def dockerfile() -> dict[str, Any]:
    """The Dockerfile's instructions that matter here, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: dict[str, Any] = {"ENV": {}}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "ENV":
            out["ENV"].update(dict(part.split("=", 1) for part in shlex.split(rest)))
        elif word in ("CMD", "ENTRYPOINT"):
            out[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            out[word] = json.loads(rest[rest.index("CMD") + 3:])
        else:
            out[word] = rest
    return out


def interpolate(value: str) -> str:
    """A compose value as compose would give it, with a stand-in for each required variable."""
    return _INTERPOLATION.sub(lambda m: m.group(2) if m.group(2) and "set it" not in m.group(2)
                              else f"x{m.group(1).lower()}", value)


def node_env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}


def container() -> dict[str, Any]:
    return MANIFESTS["Deployment"]["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def serve_port(args: list[str]) -> int:
    assert args[:1] == ["serve"] and "--host" in args and args[args.index("--host") + 1] == "0.0.0.0", args
    return int(args[args.index("--port") + 1])


def url_port_and_path(command: list[str]) -> tuple[int, str]:
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", " ".join(command))
    assert m is not None, command
    return int(m.group(1)), m.group(2)


# --- names and values -----------------------------------------------------------------------------

def test_every_environment_name_is_a_setting_or_an_alias() -> None:
    known = setting_names()
    cron = MANIFESTS["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    sources = {
        **{f"compose {service}": list(node_env(service)) for service in NODES},
        "Dockerfile ENV": list(dockerfile()["ENV"]),
        "k8s ConfigMap": list(MANIFESTS["ConfigMap"]["data"]),
        "k8s Secret": list(MANIFESTS["Secret"]["stringData"]),
        "k8s Deployment": [e["name"] for e in container()["env"]],
        "k8s CronJob": [e["name"] for e in cron.get("env", [])],
    }
    unknown = {(where, name) for where, names in sources.items() for name in names
               if name not in known and name not in NOT_SETTINGS}
    assert unknown == set(), f"not read by api.settings.Settings: {sorted(unknown)}"
    assert all(sources.values()), sources  # every file was read
    assert sum(map(len, sources.values())) > 50


def test_every_value_parses_as_the_node_would_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.restricted_api import keyring_for

    compose = {**dockerfile()["ENV"], **{k: interpolate(v) for k, v in node_env("node-a").items()}}
    cluster = {**dockerfile()["ENV"], **MANIFESTS["ConfigMap"]["data"], **MANIFESTS["Secret"]["stringData"],
               "SWITCHBOARD_WORKERS": "2", "SWITCHBOARD_NODE_ID": "switchboard-7d9f-abcde"}  # from the pod
    for source, keys_given in ((compose, False), (cluster, True)):
        with monkeypatch.context() as m:
            for name in setting_names():
                m.delenv(name, raising=False)
            for name, value in source.items():
                m.setenv(name, value)
            s = Settings()  # raises on any value that does not parse (JSON lists, numbers, bounds)
            assert s.node_dead_s >= 3 * s.node_heartbeat_s and s.persist
            assert s.redis_url is not None and s.database_url is not None and s.s3_endpoint_url
            if keys_given:  # the Secret's example key set is one the keyring takes, under the ConfigMap's id
                keyring_for(s)


def test_both_compose_nodes_share_the_secrets_and_tiers_under_distinct_node_ids() -> None:
    a, b = node_env("node-a"), node_env("node-b")
    for name in SHARED:
        assert name in a and a[name] == b[name], name
    assert a["SWITCHBOARD_NODE_ID"] != b["SWITCHBOARD_NODE_ID"]
    assert {k for k in a if k != "SWITCHBOARD_NODE_ID"} == {k for k in b if k != "SWITCHBOARD_NODE_ID"}
    secret = MANIFESTS["Secret"]["stringData"]
    for name in SHARED:  # the cluster's pods get them from one Secret, so they are equal by construction
        assert name in secret or name in MANIFESTS["ConfigMap"]["data"], name


# --- ports ------------------------------------------------------------------------------------------

def test_ports_agree_from_the_front_door_to_the_serve_command() -> None:
    df = dockerfile()
    assert df["ENTRYPOINT"] == ["switchboard"]
    port = serve_port(df["CMD"])
    assert int(df["EXPOSE"]) == port
    assert url_port_and_path(df["HEALTHCHECK"])[0] == port

    services = COMPOSE["services"]
    for service in NODES:
        assert url_port_and_path(services[service]["healthcheck"]["test"])[0] == port
        assert "command" not in services[service]  # the image's own serve command
    nginx = services["nginx"]["environment"]
    upstreams = re.findall(r"server ([a-z0-9-]+):(\d+)", nginx["NGINX_UPSTREAM_SERVERS"])
    assert sorted(upstreams) == sorted((s, str(port)) for s in NODES)
    listen = int(nginx["NGINX_LISTEN"])
    published = [p.split(":") for p in services["nginx"]["ports"]]
    assert all(int(container_port) == listen for *_, container_port in published)
    assert url_port_and_path(services["nginx"]["healthcheck"]["test"])[0] == listen

    c = container()
    assert serve_port(c["args"]) == port
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == port
    svc = MANIFESTS["Service"]["spec"]
    assert [ports[p["targetPort"]] for p in svc["ports"]] == [port]


# --- probe paths and the metric, against the application as built ----------------------------------

async def test_probe_paths_are_routes_and_the_autoscalers_metric_is_served() -> None:
    from api.app import make_app, open_runtime
    from api.middleware import PROBES

    rt = await open_runtime(Settings(persist=False, stt_provider="null", translation_provider="none",
                                     workers=1))
    try:
        app = make_app(rt)
        routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
        exposition = (await rt.metrics.render()).decode()
    finally:
        await rt.aclose()
    c = container()
    paths = {
        "Dockerfile HEALTHCHECK": url_port_and_path(dockerfile()["HEALTHCHECK"])[1],
        "compose node healthcheck": url_port_and_path(COMPOSE["services"]["node-a"]["healthcheck"]["test"])[1],
        "compose nginx healthcheck": url_port_and_path(COMPOSE["services"]["nginx"]["healthcheck"]["test"])[1],
        **{f"k8s {p}": c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")},
    }
    for where, path in paths.items():
        assert ("GET", path) in routes, (where, path)
        assert path in PROBES, (where, path)  # probes address a node by IP: exempt from the Host check
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert paths["compose node healthcheck"] == "/readyz"  # nginx starts once every tier answers

    # nginx's locations route what the application serves.
    template = local.TEMPLATE.read_text()
    assert ("GET", "/api/media/telnyx") in routes and "location /api/media/ {" in template
    sse = re.search(r"location ~ (\S+) \{", template)
    assert sse is not None and ("GET", "/api/calls/{call_id}/events") in routes
    assert re.fullmatch(sse.group(1).strip("^$"), "/api/calls/v3:abc-123_x.y/events")
    assert not re.fullmatch(sse.group(1).strip("^$"), "/api/calls/x/sse-token")

    hpa = MANIFESTS["HorizontalPodAutoscaler"]["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "switchboard_streams_active"
    assert re.search(r"^# TYPE switchboard_streams_active gauge$", exposition, re.M), exposition[:500]


# --- nginx ------------------------------------------------------------------------------------------

def test_compose_mounts_the_template_and_its_rendering_passes_nginx_t() -> None:
    nginx = COMPOSE["services"]["nginx"]
    (mount,) = nginx["volumes"]
    source, target, *_ = mount.split(":")
    assert (DEPLOY / source).resolve() == local.TEMPLATE
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".conf.template")
    env = {k: interpolate(str(v)) for k, v in nginx["environment"].items()
           if k.startswith("NGINX_") and k != "NGINX_ENVSUBST_FILTER"}
    template = local.TEMPLATE.read_text()
    assert local.template_names(template) == set(env)  # every name given, none given for nothing
    assert nginx["environment"]["NGINX_ENVSUBST_FILTER"] == "^NGINX_"  # nginx's own $variables survive
    # Docker's DNS names exist only inside the compose network: `nginx -t` resolves upstream hosts, so
    # they become loopback here; everything else is the compose file's.
    env["NGINX_UPSTREAM_SERVERS"] = re.sub(r"server node-[a-z]:", "server 127.0.0.1:", env["NGINX_UPSTREAM_SERVERS"])
    site = local.render(template, env)
    assert "${" not in site and "$host" in site and "$connection_upgrade" in site
    ok, said = local.nginx_test(site)
    assert ok, said

    # What the streams need is there, in the location that serves them.
    blocks = dict(re.findall(r"^    location ([^{]+)\{(.*?)\n    \}", site, re.S | re.M))
    media, events = blocks["/api/media/ "], blocks["~ ^/api/calls/[^/]+/events$ "]
    assert "proxy_set_header Upgrade $http_upgrade;" in media and "Connection $connection_upgrade" in media
    assert "proxy_buffering off;" in events
    for block in blocks.values():  # a location with headers of its own inherits none: the node needs these
        assert "proxy_set_header Host $host;" in block and "X-Forwarded-For $proxy_add_x_forwarded_for" in block
    assert len(blocks) == 3
    for block in (media, events):  # an hour between two reads or writes: no call is cut
        for directive in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
            assert re.search(rf"{directive} (\d+)s;", block) and int(
                re.search(rf"{directive} (\d+)s;", block).group(1)) >= 3600, (directive, block)  # type: ignore[union-attr]


def test_a_broken_site_fails_nginx_t() -> None:
    """The nginx check above can fail: the same rendering with a directive nginx does not know does."""
    site = local.render(local.TEMPLATE.read_text(), {
        "NGINX_LISTEN": "127.0.0.1:8080", "NGINX_SERVER_NAME": "localhost", "NGINX_ACCESS_LOG": "/dev/null",
        "NGINX_UPSTREAM_SERVERS": "server 127.0.0.1:8081; proxy_buffering_typo on;"})
    ok, said = local.nginx_test(site)
    assert not ok and "proxy_buffering_typo" in said


# --- stopping ---------------------------------------------------------------------------------------

def _seconds(value: str | int) -> float:
    m = re.fullmatch(r"(\d+)(s?)", str(value))
    assert m is not None, value
    return float(m.group(1))


def test_stop_bounds_cover_the_drain() -> None:
    from api.persistence import BusForwarder
    from api.runtime import UPLOAD_DRAIN_S
    from api.tiers import Tiers
    from api.workers import DRAIN_S

    writer_s = inspect.signature(Tiers.aclose).parameters["drain_s"].default
    bus_s = inspect.signature(BusForwarder.aclose).parameters["drain_s"].default
    pod = MANIFESTS["Deployment"]["spec"]["template"]["spec"]
    grace = float(MANIFESTS["ConfigMap"]["data"]["SWITCHBOARD_SHUTDOWN_GRACE_S"])
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # One process (a 1-CPU limit): the calls, then their uploads, the writer, the bus, in that order.
    single = _seconds(pre_stop[1]) + grace + UPLOAD_DRAIN_S + writer_s + bus_s
    assert pod["terminationGracePeriodSeconds"] > single
    assert pod["terminationGracePeriodSeconds"] > _seconds(pre_stop[1]) + DRAIN_S  # workers: the parent's bound
    assert pre_stop[1] and _seconds(pre_stop[1]) >= 5  # long enough for the endpoint to leave the proxies

    for service in NODES:  # compose nodes run 2 workers: the parent's DRAIN_S bounds each
        spec = COMPOSE["services"][service]
        assert int(spec["environment"]["SWITCHBOARD_WORKERS"]) > 1
        assert _seconds(spec["stop_grace_period"]) > DRAIN_S + 5
        assert float(spec["environment"]["SWITCHBOARD_SHUTDOWN_GRACE_S"]) < DRAIN_S


# --- the cluster's pieces fit together --------------------------------------------------------------

def test_kubernetes_objects_refer_to_each_other_and_to_the_image() -> None:
    dep = MANIFESTS["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["selector"]["matchLabels"] == labels
    assert MANIFESTS["Service"]["spec"]["selector"] == labels
    assert MANIFESTS["PodDisruptionBudget"]["spec"] == {"minAvailable": 1, "selector": {"matchLabels": labels}}
    target = MANIFESTS["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert MANIFESTS["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2

    c = container()
    workers = next(e for e in c["env"] if e["name"] == "SWITCHBOARD_WORKERS")["valueFrom"]["resourceFieldRef"]
    assert workers == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    assert "cpu" in c["resources"]["limits"]
    node_id = next(e for e in c["env"] if e["name"] == "SWITCHBOARD_NODE_ID")["valueFrom"]
    assert node_id == {"fieldRef": {"fieldPath": "metadata.name"}}  # each pod its own node

    cron = MANIFESTS["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    uid = int(dockerfile()["USER"])
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    assert cron["securityContext"]["runAsUser"] == uid
    (job,) = cron["containers"]
    assert job["image"] == c["image"] and job["args"][0] == "retention"
    refs = {ref["configMapRef"]["name"] if "configMapRef" in ref else ref["secretRef"]["name"]
            for ref in c["envFrom"] + job["envFrom"]}
    assert refs == {MANIFESTS["ConfigMap"]["metadata"]["name"], MANIFESTS["Secret"]["metadata"]["name"]}
    # The CronJob runs retention, so the pods do not.
    assert float(MANIFESTS["ConfigMap"]["data"]["SWITCHBOARD_RETENTION_INTERVAL_S"]) == 0
