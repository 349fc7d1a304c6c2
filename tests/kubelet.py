"""A one-node Kubernetes cluster for tests: kmock's API server, and a kubelet that really runs the pods.

**The API server** is kmock's ``KubernetesEmulator`` (objects in memory, served over real HTTP on
127.0.0.1, on its own event loop thread), with the few things of a kube-apiserver that the
``KubernetesPodOperator`` relies on: defaults on create (``uid``, ``creationTimestamp``,
``status.phase: Pending``), label selectors on pod lists, and the pod ``log`` subresource (which a
real API server proxies to the node's kubelet).

**The kubelet** is a client of that API, as a node's kubelet is: it watches pods over HTTP and, for
each new one, reads the pod back from the API (never from the test's own variables), then

- schedules it, if the node has the GPUs its container asks for (``gpu_resource`` limit); else the
  pod stays ``Pending`` with ``PodScheduled=False`` / ``Unschedulable``, as on a cluster without
  such a node;
- builds the container's environment from the pod: ``envFrom`` (``secretRef``, ``configMapRef``)
  and ``env`` (``value``, ``valueFrom.secretKeyRef`` / ``configMapKeyRef`` / ``fieldRef``), the
  Secrets and ConfigMaps read from the API; a missing one leaves the container waiting in
  ``CreateContainerConfigError``, as a kubelet does;
- runs the container's ``command`` + ``args`` (with ``$(VAR)`` expansion) as a subprocess, in its
  own session, with exactly that environment (nothing of the test process's) and a fresh home
  folder as working directory;
- keeps its stdout and stderr, merged and timestamped, as the pod log, served to any number of
  readers (``follow``, ``timestamps``, ``sinceSeconds``, ``sinceTime``, ``tailLines``);
- reports the phases through the API (``PATCH .../status``): ``Pending`` (``ContainerCreating``),
  ``Running``, then ``Succeeded`` or ``Failed`` with the real exit code (128 + N after signal N),
  and the termination message: with ``terminationMessagePolicy: FallbackToLogsOnError`` the end of
  the log (the last 80 lines, at most 2,048 bytes) when the container failed;
- honours deletion: when the pod is deleted it sends SIGTERM to the container's processes and
  SIGKILL after the grace period.

:meth:`Cluster.lose_node` plays a node that disappears: the container is killed, no status is
reported any more, and the pod is force-deleted, as the pod garbage collector does.

**Where the container runs.** By default (``runtime="venv"``) the pod's image is *not* run: the
container's command runs in the project's environment instead (the ``.venv`` whose ``bin`` is first
on the container's ``PATH``, standing in for the trainer image's ``/opt/venv``), so ``image``,
``imagePullPolicy`` and ``securityContext`` are recorded in the pod but have no effect. With
``runtime="buildah"`` (root, Debian's buildah; ``make image-check`` builds the trainer image) it runs
in the pod's image, which must be on the machine (never pulled): a buildah working container with
chroot isolation and the machine's network, as the pod's ``runAsUser``/``runAsGroup``. Either way
volumes and resource limits other than the GPU count have no effect. One container per pod (the operator's
``base``), ``restartPolicy: Never``, no init containers or sidecars, no ``terminationMessagePath``
file (the message comes from the log only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock

PODS = "v1/pods"
AGENT = "personcar-test-node"  # the User-Agent of the emulator's own API calls (kubelet, pod GC)
NODE = "node-1"
VENV_BIN = Path(sys.executable).parent  # the project's environment: the stand-in for the image's /opt/venv/bin
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048  # what FallbackToLogsOnError keeps of the log


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")  # RFC 3339 with nanoseconds, as the kubelet writes it


class ContainerConfigError(Exception):
    """The container cannot be created from its pod spec (a missing Secret, ConfigMap or key)."""


def selector_matches(labels: dict[str, str], selector: str) -> bool:
    """Whether ``labels`` satisfy an equality-based label selector (``a=b,c!=d,e,!f``)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = term.split("=", 1)
            ok = labels.get(key.strip().rstrip("=")) == value.strip()
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in ``command``/``args``/``env`` (``$$`` escapes; unknown stays)."""
    return re.sub(r"\$\$|\$\((\w+)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class PodRun:
    """One container run by the kubelet: what it ran, its log, how it ended."""

    namespace: str
    name: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    log: list[tuple[dt.datetime, bytes]] = field(default_factory=list)
    pid: int | None = None
    exit_code: int | None = None
    message: str = ""
    lost: bool = False  # its node disappeared: nothing reports on it any more
    container: str = ""  # the buildah working container (runtime "buildah")
    deleted: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def text(self) -> str:
        return b"".join(line for _, line in self.log).decode("utf-8", "replace")


class Cluster:
    """kmock's API server and the kubelet on its own event loop thread, serving http://127.0.0.1:PORT."""

    def __init__(self, root: Path, *, namespace: str = "personcar", gpus: int = 1,
                 gpu_resource: str = "nvidia.com/gpu", grace_seconds: float | None = None,
                 runtime: str = "venv") -> None:
        if runtime not in ("venv", "buildah"):
            raise ValueError(f"runtime must be 'venv' or 'buildah', not {runtime!r}")
        self.root, self.namespace, self.gpus, self.gpu_resource = Path(root), namespace, gpus, gpu_resource
        self.runtime = runtime  # venv: the project's environment; buildah: the pod's image
        self.grace_seconds = grace_seconds  # instead of the pod's terminationGracePeriodSeconds (default 30)
        self.url = ""
        self.api: Any = None
        self.runs: dict[tuple[str, str], PodRun] = {}
        self.errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-cluster", daemon=True)
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request is too many
        self._thread.start()
        if not self._ready.wait(20) or self.errors:
            raise RuntimeError(f"the emulated cluster did not start: {self.errors or 'timeout'}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self.errors.append(exc)
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
            self.api, self.url = api, str(server.url).rstrip("/")
            self._configure(api)
            async with aiohttp.ClientSession(base_url=self.url, headers={"User-Agent": AGENT}) as http:
                self._http = http
                watch = asyncio.create_task(self._watch_pods())
                await self._stop.wait()
                watch.cancel()
                for run in self.runs.values():
                    self._signal(run, signal.SIGKILL)
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    def _configure(self, api: Any) -> None:
        api.resources[PODS] = kmock.ResourceInfo(namespaced=True, kind="Pod", subresources={"log", "status"})
        for plural, kind in (("events", "Event"), ("secrets", "Secret"), ("configmaps", "ConfigMap")):
            api.resources[f"v1/{plural}"] = kmock.ResourceInfo(namespaced=True, kind=kind)
        pods = kmock.resource(PODS)
        # Reactions are tried in order: the log subresource before anything else about pods.
        api[kmock.action.FETCH, pods, kmock.subresource("log")] << self._serve_log
        api[kmock.action.LIST, pods] << self._serve_pod_list
        api[kmock.action.CREATE, pods] << self._default_new_pod

    # -- the API server's part -----------------------------------------------------------------
    def _stored(self, namespace: str, name: str) -> Any:
        obj = self.api.objects[PODS, namespace, name]
        if obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj

    def _default_new_pod(self, request: Any) -> dict[str, Any]:
        meta = request.data["metadata"]
        obj = self._stored(request.namespace or meta["namespace"], meta["name"])
        defaults: dict[str, Any] = {"metadata": {"uid": os.urandom(8).hex(), "resourceVersion": "1",
                                                 "creationTimestamp": now()}}
        if not (obj.get("status") or {}).get("phase"):
            defaults["status"] = {"phase": "Pending", "qosClass": "Burstable"}
        obj.patch(defaults)
        return obj.raw

    def _serve_pod_list(self, request: Any) -> dict[str, Any]:
        selector = request.params.get("labelSelector", "")
        items = [obj.raw for (resource, ns, _), obj in list(self.api.objects.items())
                 if resource == kmock.resource(PODS) and not obj.deleted
                 and (request.namespace is None or ns == request.namespace)
                 and selector_matches((obj.get("metadata") or {}).get("labels") or {}, selector)]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

    async def _serve_log(self, request: Any) -> Any:
        obj = self._stored(request.namespace, request.name)
        run = self.runs.get((request.namespace, request.name))
        container = obj["spec"]["containers"][0]["name"]
        if request.params.get("container", container) != container:
            raise kmock.KubernetesError(400, "BadRequest", f"container {request.params['container']} is not valid "
                                                           f"for pod {request.name}")
        if run is None or not run.started.is_set():
            raise kmock.KubernetesError(400, "BadRequest", f'container "{container}" in pod "{request.name}" is '
                                                           "waiting to start: ContainerCreating")
        p = request.params
        since = None
        if p.get("sinceSeconds"):
            since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(p["sinceSeconds"]))
        elif p.get("sinceTime"):
            since = dt.datetime.fromisoformat(p["sinceTime"].replace("Z", "+00:00"))
        stream = self._log_stream(run, follow=p.get("follow", "").lower() == "true",
                                  timestamps=p.get("timestamps", "").lower() == "true", since=since,
                                  tail=int(p["tailLines"]) if p.get("tailLines") else None)
        return kmock.Response(payload=stream, headers={"Content-Type": "text/plain"})

    async def _log_stream(self, run: PodRun, *, follow: bool, timestamps: bool, since: dt.datetime | None,
                          tail: int | None) -> Any:
        yield b""  # send the headers now, whether or not there is a line yet
        lines = [i for i, (t, _) in enumerate(run.log) if since is None or t >= since]
        i = lines[-tail] if tail and len(lines) >= tail else (lines[0] if lines else len(run.log))
        while True:
            while i < len(run.log):
                t, line = run.log[i]
                yield (f"{_stamp(t)} ".encode() + line) if timestamps else line
                i += 1
            if not follow or run.finished.is_set():
                return
            async with run.changed:
                await run.changed.wait_for(lambda seen=i: len(run.log) > seen or run.finished.is_set())

    # -- the kubelet's part: an API client ------------------------------------------------------
    async def _get(self, path: str) -> dict[str, Any] | None:
        assert self._http is not None
        async with self._http.get(path) as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            return await resp.json()

    async def _report(self, run: PodRun, status: dict[str, Any]) -> None:
        """PATCH the pod's status, unless its node is gone or the pod is."""
        if run.lost or run.deleted:
            return
        assert self._http is not None
        async with self._http.patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                                    json={"status": status},
                                    headers={"Content-Type": "application/merge-patch+json"}) as resp:
            if resp.status != 404:
                resp.raise_for_status()

    async def _watch_pods(self) -> None:
        assert self._http is not None
        while True:
            try:
                async with self._http.get("/api/v1/pods", params={"watch": "true"}, timeout=None) as resp:
                    resp.raise_for_status()
                    self._ready.set()
                    async for raw in resp.content:
                        if raw.strip():
                            self._on_event(json.loads(raw))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.2)

    def _on_event(self, event: dict[str, Any]) -> None:
        meta = event["object"]["metadata"]
        key = (meta["namespace"], meta["name"])
        if event["type"] == "ADDED" and (key not in self.runs or self.runs[key].deleted):
            self.runs[key] = run = PodRun(*key)
            asyncio.create_task(self._guarded(self._start(run)))
        elif event["type"] == "DELETED" and key in self.runs:
            run = self.runs[key]
            run.deleted = True
            if not run.lost:
                asyncio.create_task(self._guarded(self._terminate(run, event["object"])))

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except Exception as exc:
            self.errors.append(exc)

    def _container_status(self, c: dict[str, Any], state: dict[str, Any], *, ready: bool = False) -> dict[str, Any]:
        return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": ready, "restartCount": 0,
                "started": "running" in state, "state": state}

    def _conditions(self, scheduled: bool, ready: bool = False, reason: str = "", message: str = "") -> list:
        cond = [{"type": "PodScheduled", "status": str(scheduled), "lastTransitionTime": now(),
                 **({"reason": reason, "message": message} if reason else {})}]
        if scheduled:
            cond += [{"type": t, "status": str(ready), "lastTransitionTime": now()}
                     for t in ("Initialized", "ContainersReady", "Ready")]
        return cond

    async def _start(self, run: PodRun) -> None:
        pod = await self._get(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}")  # what the API holds
        if pod is None:
            return
        spec = pod["spec"]
        if len(spec["containers"]) != 1 or spec.get("initContainers"):
            raise NotImplementedError(f"pod {run.name}: the emulated kubelet runs one container, no init containers")
        c = spec["containers"][0]
        wanted = int(((c.get("resources") or {}).get("limits") or {}).get(self.gpu_resource, 0))
        if wanted > self.gpus:
            await self._report(run, {"phase": "Pending", "conditions": self._conditions(
                False, reason="Unschedulable",
                message=f"0/1 nodes are available: 1 Insufficient {self.gpu_resource}.")})
            return
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        await self._report(run, {"phase": "Pending", "hostIP": "127.0.0.1", "conditions": self._conditions(True),
                                 "containerStatuses": [self._container_status(c, waiting)]})
        run.workdir = self.root / f"{run.namespace}.{run.name}"
        home = run.workdir / "home"
        (run.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        home.mkdir(exist_ok=True)
        try:
            env = await self._environment(pod, c, home, run.workdir / "tmp")
        except ContainerConfigError as exc:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            await self._report(run, {"containerStatuses": [self._container_status(c, state)]})
            return
        if run.deleted:  # deleted while its container was being created
            return
        run.env = env
        run.argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
        started = now()
        if self.runtime == "buildah":
            proc = await self._start_in_image(run, pod, c, env)
            if proc is None:
                return
        else:
            exe = shutil.which(run.argv[0], path=env["PATH"]) if run.argv else None
            if exe is None:
                run.started.set()
                await self._finish(run, pod, c, 128, started, reason="StartError", message=(
                    f'exec: "{run.argv[0] if run.argv else ""}": executable file not found in $PATH'))
                return
            proc = await asyncio.create_subprocess_exec(
                exe, *run.argv[1:], env=env, cwd=c.get("workingDir") or home, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        run.pid = proc.pid
        run.started.set()
        await self._report(run, {"phase": "Running", "podIP": "127.0.0.1", "startTime": started,
                                 "conditions": self._conditions(True, ready=True),
                                 "containerStatuses": [self._container_status(c, {"running": {"startedAt": started}},
                                                                              ready=True)]})
        await self._pump(run, proc)
        code = await proc.wait()
        if run.container:
            await (await asyncio.create_subprocess_exec("buildah", "rm", run.container,
                                                        stdout=asyncio.subprocess.DEVNULL)).wait()
        await self._finish(run, pod, c, code if code >= 0 else 128 - code, started)

    async def _start_in_image(self, run: PodRun, pod: dict[str, Any], c: dict[str, Any],
                              env: dict[str, str]) -> Any:
        """The container's command in the pod's image: a buildah working container of the local
        image (never pulled), chroot isolation, the node's network, the pod's user; None when the
        image is not on the node (the container stays waiting, as with ``imagePullPolicy: Never``)."""
        made = await asyncio.create_subprocess_exec("buildah", "from", "--pull=never", "--quiet", c["image"],
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await made.communicate()
        if made.returncode != 0:
            state = {"waiting": {"reason": "ErrImageNeverPull",
                                 "message": f'image "{c["image"]}" is not on the node: {err.decode().strip()}'}}
            await self._report(run, {"containerStatuses": [self._container_status(c, state)]})
            return None
        run.container = out.decode().strip()
        sc = {**(pod["spec"].get("securityContext") or {}), **(c.get("securityContext") or {})}
        user = [f"--user={sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"] if "runAsUser" in sc else []
        workdir = [f"--workingdir={c['workingDir']}"] if c.get("workingDir") else []
        return await asyncio.create_subprocess_exec(
            "buildah", "run", "--isolation=chroot", "--network=host", *user, *workdir,
            *(f"--env={k}={v}" for k, v in env.items()), run.container, "--", *run.argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)

    async def _pump(self, run: PodRun, proc: Any) -> None:
        """Keep the container's output as its log, line by line, timestamped when it arrived."""
        pending = b""
        while chunk := await proc.stdout.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            async with run.changed:
                run.log.extend((dt.datetime.now(dt.UTC), line + b"\n") for line in lines)
                run.changed.notify_all()
        if pending:
            async with run.changed:
                run.log.append((dt.datetime.now(dt.UTC), pending + b"\n"))

    async def _finish(self, run: PodRun, pod: dict[str, Any], c: dict[str, Any], code: int, started: str, *,
                      reason: str | None = None, message: str | None = None) -> None:
        run.exit_code = code
        if message is None:
            message = ""
            if code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                tail = b"".join(line for _, line in run.log[-FALLBACK_LINES:])[-FALLBACK_BYTES:]
                message = tail.decode("utf-8", "replace")
        run.message = message
        terminated = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                      "startedAt": started, "finishedAt": now(), **({"message": message} if message else {})}
        await self._report(run, {"phase": "Succeeded" if code == 0 else "Failed",
                                 "conditions": self._conditions(True, ready=False),
                                 "containerStatuses": [self._container_status(c, {"terminated": terminated})]})
        async with run.changed:
            run.finished.set()
            run.changed.notify_all()

    async def _environment(self, pod: dict[str, Any], c: dict[str, Any], home: Path, tmp: Path) -> dict[str, str]:
        """The container's environment, from the pod spec and the Secrets/ConfigMaps it names."""
        ns = pod["metadata"]["namespace"]
        env = {"HOSTNAME": pod["metadata"]["name"],
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": self.url.rsplit(":", 1)[-1]}
        if self.runtime == "venv":  # in an image, its own PATH and HOME apply
            env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp),
                   "LANG": "C.UTF-8", **env}

        async def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
            obj = await self._get(f"/api/v1/namespaces/{ns}/{kind}s/{name}")
            if obj is None:
                if optional:
                    return None
                raise ContainerConfigError(f'{kind} "{name}" not found')
            if kind == "secret":
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return dict(obj.get("data") or {})

        for ref in c.get("envFrom") or []:
            kind = "secret" if "secretRef" in ref else "configmap"
            spec = ref.get("secretRef") or ref.get("configMapRef")
            data = await source(kind, spec["name"], spec.get("optional", False)) or {}
            env.update({ref.get("prefix", "") + k: v for k, v in data.items()})
        for var in c.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            frm = var["valueFrom"]
            if "fieldRef" in frm:
                path = frm["fieldRef"]["fieldPath"].split(".")
                value: Any = pod
                for part in path:
                    value = (value or {}).get(part)
                env[var["name"]] = str(value or "")
                continue
            kind, ref = ("secret", frm["secretKeyRef"]) if "secretKeyRef" in frm else ("configmap", frm["configMapKeyRef"])
            data = await source(kind, ref["name"], ref.get("optional", False))
            if data is not None and ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
            elif not ref.get("optional", False):
                raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind.title()} {ns}/{ref['name']}")
        return env

    async def _terminate(self, run: PodRun, pod: dict[str, Any]) -> None:
        """The pod was deleted: SIGTERM, then SIGKILL after the grace period."""
        if run.pid is None or run.finished.is_set():
            return
        grace = self.grace_seconds
        if grace is None:
            grace = float((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        self._signal(run, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(run.finished.wait), grace)
        self._signal(run, signal.SIGKILL)

    @staticmethod
    def _signal(run: PodRun, sig: int) -> None:
        if run.pid is not None and run.exit_code is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, sig)

    async def _lose_node(self, namespace: str, name: str) -> None:
        run = self.runs[(namespace, name)]
        run.lost = True  # nothing reports on the pod from now on
        self._signal(run, signal.SIGKILL)
        await asyncio.to_thread(run.finished.wait, 30)
        assert self._http is not None
        async with self._http.delete(f"/api/v1/namespaces/{namespace}/pods/{name}",
                                     params={"gracePeriodSeconds": "0"}) as resp:  # the pod GC's force delete
            resp.raise_for_status()

    # -- what a test does and inspects (from its own thread) ------------------------------------
    def _call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def lose_node(self, name: str, namespace: str | None = None) -> None:
        """The node running pod ``name`` disappears: its container is killed and the pod force-deleted."""
        self._call(self._lose_node(namespace or self.namespace, name))

    def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> None:
        """Create an object through the API (as ``kubectl create`` would)."""
        ns = namespace or self.namespace
        body = {"apiVersion": "v1", **body, "metadata": {"namespace": ns, **body["metadata"]}}
        req = urllib.request.Request(f"{self.url}/api/v1/namespaces/{ns}/{plural}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "User-Agent": AGENT})
        urllib.request.urlopen(req, timeout=10).close()

    def create_secret(self, name: str, data: dict[str, str], namespace: str | None = None) -> None:
        self.create("secrets", {"kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
                                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}},
                    namespace)

    def kubeconfig(self, path: Path, context: str = "emulated") -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: {context}\n  cluster:\n    server: {self.url}\n    insecure-skip-tls-verify: true\n"
            f"users:\n- name: {context}\n  user:\n    token: not-a-secret\n"
            f"contexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {context}\n"
            f"    namespace: {self.namespace}\n"
            f"current-context: {context}\n")
        return path

    def requests(self, method: str, *, subresource: str | None = "any", resource: str = PODS) -> list[Any]:
        """The requests the clients (not the emulator itself) sent about ``resource``, in order."""
        out = []
        for request in list(self.api):
            if request.method.value != method or request.resource != kmock.resource(resource):
                continue
            if request.headers.get("User-Agent") == AGENT:
                continue
            if subresource != "any" and request.subresource != subresource:
                continue
            out.append(request)
        return out

    def pod(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The pod as the API holds it now (None once deleted)."""
        key = (kmock.resource(PODS), namespace or self.namespace, name)
        if key not in self.api.objects or self.api.objects[key].deleted:
            return None
        return json.loads(json.dumps(self.api.objects[key].raw))

    def check(self) -> None:
        """Fail when the emulator itself hit an error (raised here, in the test's thread)."""
        if self.errors:
            raise RuntimeError(f"emulated cluster errors: {self.errors!r}") from self.errors[0]
