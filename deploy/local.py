"""The several-nodes topology on this machine: nginx in front of N Switchboard nodes sharing one
PostgreSQL and one Valkey, as deploy/docker-compose.yml runs it in containers.

    python -m deploy.local [--nodes 2] [--workers 1] [--database-url URL --redis-url URL]

Without URLs it starts an embedded PostgreSQL and Valkey (storage/embedded.py) under ``--dir``.  It
prints the front door's URL and each node's, and runs until Ctrl-C.  Tests import it
(tests/deploy/test_topology.py: ``running(...)``) and pass the session's servers.

What is the same as in containers, and so tested here:

    piece           here                                      in deploy/docker-compose.yml
    nginx's site    deploy/nginx/switchboard.conf.template,   the same file, rendered by the
                    rendered by ``render`` (envsubst of        official image's entrypoint
                    NGINX_* names, as the image does)
    a node          ``python -m api.cli serve --workers W``    the image's `switchboard serve`
    node identity   SWITCHBOARD_NODE_ID node-a, node-b, ...    the same
    shared secrets  one random set for all nodes (blob         deploy/.env, the same for all
                    signing, call token, encryption keys,
                    metrics token)

What differs: nginx is Debian's (``make sysdeps`` installs it), run as a non-root process with its own
prefix (config, temp directories, pid, logs) under a private temporary directory, on a free loopback
port; when this runs as root nginx runs as ``nobody`` (it never needs privileges: no port below 1024,
no ``user`` directive).  Only the main context (``nginx_main_conf``) is written here: the official image
brings its own.  The nodes bind loopback on free ports and trust nginx (127.0.0.1) as their proxy.

Bounds: a node or nginx that does not answer /healthz within ``START_TIMEOUT_S`` fails the start (its log
is in the error); ``stop`` gives each process ``STOP_TIMEOUT_S`` after SIGTERM, then SIGKILL.  Nothing
outlives the launcher: each process started here has a lifeline (``storage.lifeline``) that sends it
SIGTERM if the launcher dies without stopping it (a test run killed by its timeout, ``kill -9``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from storage.lifeline import Lifeline

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
TEMPLATE = DEPLOY / "nginx" / "switchboard.conf.template"
START_TIMEOUT_S = 120.0  # a node's start: migrate, open the tiers, warm its recognisers
STOP_TIMEOUT_S = 40.0  # SIGTERM -> SIGKILL: a node drains its calls (SHUTDOWN_GRACE_S, workers' DRAIN_S)
NGINX_USER = "nobody"  # who runs nginx when this runs as root
_NAME = re.compile(r"\$(?:\{(NGINX_[A-Za-z0-9_]*)\}|(NGINX_[A-Za-z0-9_]*))")


class NginxMissing(RuntimeError):
    """Debian's nginx is not installed (``make sysdeps`` installs it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``${NGINX_X}`` / ``$NGINX_X`` replaced, as the official nginx image's
    envsubst does with NGINX_ENVSUBST_FILTER=^NGINX_ (nginx's own ``$variables`` are left alone).  A name
    the template uses and ``values`` lacks is an error here (envsubst would leave it, and nginx fail)."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"the nginx template uses {name}, which has no value")
        return values[name]

    return _NAME.sub(one, template)


def template_names(template: str) -> set[str]:
    """The NGINX_* names ``template`` uses."""
    return {m.group(1) or m.group(2) for m in _NAME.finditer(template)}


def upstream_servers(addresses: list[str]) -> str:
    """NGINX_UPSTREAM_SERVERS for nodes at ``addresses`` (host:port), as the compose file writes it."""
    return " ".join(f"server {a} max_fails=1 fail_timeout=5s;" for a in addresses)


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """The main context around a rendered site: everything nginx writes goes under ``prefix``."""
    return "\n".join([
        "worker_processes 1;",  # one worker: round robin is then exactly alternating (tests rely on it)
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log warn;",
        "worker_rlimit_nofile 8192;",
        "events { worker_connections 4096; }",
        "http {",
        f"    client_body_temp_path {prefix}/tmp/body;",
        f"    proxy_temp_path {prefix}/tmp/proxy;",
        f"    fastcgi_temp_path {prefix}/tmp/fastcgi;",
        f"    uwsgi_temp_path {prefix}/tmp/uwsgi;",
        f"    scgi_temp_path {prefix}/tmp/scgi;",
        f"    include {site};",
        "}",
        "",
    ])


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        raise NginxMissing("nginx is not installed: `make sysdeps` installs Debian's")
    return found


def _run_as() -> dict[str, int]:
    """Popen's user/group: ``NGINX_USER`` when we are root, else ourselves (nothing to change)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(NGINX_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def nginx_prefix(site_conf: str) -> Path:
    """A private directory holding nginx's main config, the rendered site and its temp and log files,
    owned by whoever runs nginx."""
    prefix = Path(tempfile.mkdtemp(prefix="switchboard-nginx-"))
    (prefix / "tmp").mkdir()
    (prefix / "site.conf").write_text(site_conf)
    (prefix / "nginx.conf").write_text(nginx_main_conf(prefix, prefix / "site.conf"))
    ids = _run_as()
    if ids:
        for path in (prefix, prefix / "tmp", prefix / "site.conf", prefix / "nginx.conf"):
            os.chown(path, ids["user"], ids["group"])
    return prefix


def nginx_test(site_conf: str) -> tuple[bool, str]:
    """``nginx -t`` on ``site_conf`` in the main context this module writes: (passed, nginx's words)."""
    prefix = nginx_prefix(site_conf)
    try:
        # stdout is /dev/null, not a pipe: a site logging to /dev/stdout (a container's) opens it, and a
        # pipe made by root does not open for nobody; nginx says what it found on stderr.
        done = subprocess.run([nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                               "-e", str(prefix / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=30, **_run_as())  # type: ignore[call-overload]
        return done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes], lifeline: Lifeline | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    if lifeline is not None:
        lifeline.disarm()  # we stop it ourselves
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Node:
    name: str  # node-a, node-b, ...: also its SWITCHBOARD_NODE_ID
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    lifeline: Lifeline | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/media/telnyx"

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Topology:
    nodes: list[Node]
    nginx_port: int
    nginx_prefix: Path
    nginx: subprocess.Popen[bytes]
    env: dict[str, str]  # what every node got (secrets included): a test may use the metrics token
    nginx_lifeline: Lifeline | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}/api/media/telnyx"

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.name == node_id)

    def kill(self, node_id: str) -> None:
        """SIGKILL a node: no drain, no clean-up, as a lost host."""
        node = self.node(node_id)
        if node.lifeline is not None:
            node.lifeline.disarm()
        node.proc.kill()
        node.proc.wait()

    def nginx_log(self) -> str:
        out = []
        for name in ("error.log", "access.log"):
            path = self.nginx_prefix / name
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        _stop(self.nginx, self.nginx_lifeline, 10)
        for node in self.nodes:
            _stop(node.proc, node.lifeline)
        shutil.rmtree(self.nginx_prefix, ignore_errors=True)


def shared_secrets() -> dict[str, str]:
    """One set for every node of a topology (deploy/.env in compose): what one node signs, another accepts."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        "SWITCHBOARD_BLOB_SIGNING_KEY": secrets.token_urlsafe(32),
        "SWITCHBOARD_CALL_TOKEN_KEY": secrets.token_urlsafe(32),
        "SWITCHBOARD_ENCRYPTION_KEYS": f'{{"local1": "{key}"}}',
        "SWITCHBOARD_ENCRYPTION_KEY_ID": "local1",
        "SWITCHBOARD_METRICS_TOKEN": secrets.token_urlsafe(24),
    }


def start(prefix: Path, *, database_url: str, redis_url: str, app_password: str, nodes: int = 2, workers: int = 1,
          env: Mapping[str, str] | None = None, node_env: Mapping[int, Mapping[str, str]] | None = None) -> Topology:
    """Start ``nodes`` nodes (``workers`` processes each) and nginx in front; each node's files under
    ``prefix/<name>``.  ``env`` goes to every node after the defaults, ``node_env[i]`` to node i only."""
    prefix.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, **shared_secrets(),
            "DATABASE_URL": database_url, "SWITCHBOARD_DATABASE_APP_PASSWORD": app_password, "REDIS_URL": redis_url,
            "SWITCHBOARD_PERSIST": "true", "SWITCHBOARD_WORKERS": str(workers),
            "SWITCHBOARD_TRUSTED_PROXIES": '["127.0.0.1"]', "SWITCHBOARD_LOG_LEVEL": "INFO",
            **(env or {})}
    started: list[Node] = []
    try:
        for i in range(nodes):
            name = f"node-{chr(ord('a') + i)}"
            port = free_port()
            data_dir = prefix / name
            data_dir.mkdir(parents=True, exist_ok=True)
            log_path = prefix / f"{name}.log"
            node_vars = {**base, "SWITCHBOARD_NODE_ID": name, "SWITCHBOARD_DATA_DIR": str(data_dir),
                         **((node_env or {}).get(i) or {})}
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=ROOT, env=node_vars, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(Node(name, port, data_dir, log_path, proc, Lifeline(proc.pid, signal.SIGTERM, name)))
        for node in started:  # they start together (one migrates at a time); wait for each
            _wait_healthy(node.http, node.proc, node.name, node.log_path, START_TIMEOUT_S)
        nginx_port = free_port()
        site = render(TEMPLATE.read_text(), {
            "NGINX_LISTEN": f"127.0.0.1:{nginx_port}",
            "NGINX_SERVER_NAME": "localhost 127.0.0.1",
            "NGINX_UPSTREAM_SERVERS": upstream_servers([f"127.0.0.1:{n.port}" for n in started]),
            "NGINX_ACCESS_LOG": "access.log",  # relative to the prefix
        })
        nginx_dir = nginx_prefix(site)
        with open(nginx_dir / "nginx.out", "wb") as out:
            proc = subprocess.Popen(
                [nginx_binary(), "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"),
                 "-e", str(nginx_dir / "error.log"), "-g", "daemon off;"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **_run_as())  # type: ignore[call-overload]
        topo = Topology(started, nginx_port, nginx_dir, proc, {k: v for k, v in base.items() if k not in os.environ},
                        Lifeline(proc.pid, signal.SIGTERM, "nginx"))
        try:
            _wait_healthy(topo.url, proc, "nginx", nginx_dir / "error.log", 30)
        except BaseException:
            topo.stop()
            raise
        return topo
    except BaseException:
        for node in started:
            _stop(node.proc, node.lifeline, 10)
        raise


@contextlib.contextmanager
def running(prefix: Path, **kwargs: object) -> Iterator[Topology]:
    """``start(prefix, **kwargs)``, stopped on exit."""
    topo = start(prefix, **kwargs)  # type: ignore[arg-type]
    try:
        yield topo
    finally:
        topo.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="server processes per node")
    parser.add_argument("--dir", type=Path, default=ROOT / ".switchboard-local",
                        help="where the nodes' data (and the embedded servers) live")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="a superuser URL (default: an embedded PostgreSQL under --dir)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="default: an embedded Valkey under --dir")
    args = parser.parse_args(argv)

    from storage import embedded
    from storage.db import with_database

    with contextlib.ExitStack() as stack:
        database_url, redis_url = args.database_url, args.redis_url
        if database_url is None:
            pg = embedded.start_postgres(args.dir / "postgres")
            stack.callback(pg.shutdown)
            database_url = with_database(pg.uri, "switchboard")  # created by the first node's start
        if redis_url is None:
            valkey = embedded.start_valkey(args.dir / "valkey")
            stack.callback(valkey.shutdown)
            redis_url = valkey.url
        password = os.environ.get("SWITCHBOARD_DATABASE_APP_PASSWORD") or secrets.token_urlsafe(24)
        topo = stack.enter_context(running(args.dir, database_url=database_url, redis_url=redis_url,
                                           app_password=password, nodes=args.nodes, workers=args.workers))
        print(f"front door (nginx): {topo.url}   media: {topo.ws}", flush=True)
        for node in topo.nodes:
            print(f"  {node.name}: {node.http}  (log {node.log_path})", flush=True)
        print(f"metrics token: {topo.env['SWITCHBOARD_METRICS_TOKEN']}   Ctrl-C stops everything", flush=True)
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop and all(n.alive() for n in topo.nodes) and topo.nginx.poll() is None:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
