"""The deployment files agree with the code: every Kubernetes overlay rendered with
`kubectl kustomize` and read against the server's config and a running server; the container
image's build step (prepare_model.py) and start script (entrypoint.sh) run on the host.

No container runtime or cluster runs here (docs/deploy.md says what was and was not run):
what can be checked without one is checked for real.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from client_demo.pacing import send_paced
from server.config import load_config
from tests.fleet import CHORUS, ROOT, Replica, http_get
from tests.ports import free_port
from tests.scrape import metric
from tests.serverharness import ADMISSION_OFF, DATA, pcm16, read_clip
from tests.waiting import async_wait_until, wait_until

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="SKIPPED: kubectl is not installed, so the Kubernetes overlays cannot be rendered "
                            "(kubectl has kustomize built in; scripts/setup.sh says how to get it)")


def render(overlay: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def pod_config(docs: list[dict], tmp_path: Path, *extra_sets: str):
    """The Config a pod runs: its ConfigMap's file, with CHORUS_SET applied as the entrypoint does."""
    deployment = one(docs, "Deployment")
    c = container(docs)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    env = env_of(c)
    path = Path(env["CHORUS_CONFIG"])
    assert path.parent == Path(mount["mountPath"]) and path.name in cm["data"], (path, mount, list(cm["data"]))
    local = tmp_path / path.name
    local.write_text(cm["data"][path.name])
    sets = [s for s in env.get("CHORUS_SET", "").split()] + list(extra_sets)
    return local, sets, load_config(local, dict(s.split("=", 1) for s in sets))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_agrees_with_the_config_it_runs(overlay, tmp_path):
    docs = render(overlay)
    _, _, cfg = pod_config(docs, tmp_path)
    deployment, service, hpa, pdb = (one(docs, k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"))
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # Ports: the container's are the server's.
    assert ports == {"http": cfg.server.port, "api": cfg.api_port, "funasr": cfg.funasr.port}
    assert cfg.server.host == "0.0.0.0"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    # Probes: readiness and startup on /healthz (accepts new sessions), liveness on /livez.
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    # The drain fits: the preStop pause plus the server's shutdown timeout within the grace period.
    spec = deployment["spec"]["template"]["spec"]
    pause = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= float(pause[1]) + cfg.server.shutdown_timeout_s + 5
    # Rolling updates never drop below the running count; disruptions take one pod at a time.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert selector and selector.items() <= labels.items(), (selector, labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    # The autoscaler reads chorus_load_ratio from this Deployment's pods, scales down slowly.
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["chorus_load_ratio"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # The model directory the image builds (Dockerfile) is the one the config names.
    assert cfg.runner.model in (ROOT / "Dockerfile").read_text()
    resources = c["resources"]
    if overlay == "gpu":
        assert cfg.runner.device.startswith("cuda")
        assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    else:
        assert cfg.runner.device == "cpu" and "nvidia.com/gpu" not in json.dumps(resources)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("SKIPPED: kubernetes-validate is not installed, so the manifests are not schema-checked "
                    "(pip install kubernetes-validate; scripts/setup.sh installs it)")
    for doc in render(overlay):
        # strict: an unknown field (a typo) is an error, as `kubectl apply --validate=strict` makes it.
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_dockerfile_copies_what_exists_and_runs_the_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
    copied = dict(reversed(m) for m in re.findall(r"^COPY (\S+) (\S+)$", text, re.M))
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))[0]
    assert copied[entry] == "deploy/container/entrypoint.sh"
    assert copied["/etc/chorus/chorus.yaml"] == "deploy/container/chorus.yaml"
    image_cfg = load_config(ROOT / "deploy" / "container" / "chorus.yaml", {})
    assert f"prepare_model.py {image_cfg.runner.model}" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The image's build step, run here: the embedded weights joined into a model directory."""
    target = tmp_path_factory.mktemp("image") / "models" / "whisper-base"
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "container" / "prepare_model.py"), str(target)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return target


def test_prepare_model_builds_the_directory_the_server_loads(model_dir):
    from server.runners.whisper.assets import MODEL_BIN_SIZE

    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.bin", "tokenizer.json"]
    assert (model_dir / "model.bin").stat().st_size == MODEL_BIN_SIZE
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith("chorus-join-")]  # no scratch left


@needs_kubectl
def test_a_pod_s_server_started_by_the_entrypoint_means_what_the_probes_and_autoscaler_assume(model_dir, tmp_path):
    """The cpu overlay's config, started as the image starts it (entrypoint.sh: exec, config file,
    CHORUS_SET), on loopback: startup and readiness 503 while loading with liveness 200; ready
    and live when warm; full (max 2 sessions): not ready, still live, chorus_load_ratio 1.0;
    SIGTERM: not ready from the first moment, still live, every session gets `done` and the
    configured close code, exit 0."""
    docs = render("cpu")
    port = free_port()
    config_file, sets, _ = pod_config(docs, tmp_path)
    overrides = ["server.host=127.0.0.1", f"server.port={port}", f"funasr.port={free_port()}",
                 f"api.port={free_port()}", f"runner.model={model_dir}", "server.max_sessions=2",
                 *(f"{k}={v}" for k, v in ADMISSION_OFF.items())]
    _, _, cfg = pod_config(docs, tmp_path, *overrides)
    env = {"CHORUS_CONFIG": str(config_file), "CHORUS_SET": " ".join(sets + overrides), "CHORUS_BIN": str(CHORUS)}
    pod = Replica("pod", argv=["sh", str(ROOT / "deploy" / "container" / "entrypoint.sh")], env=env)
    pod.port = port
    try:
        pod.start()
        assert pod.proc is not None
        loading: list[tuple[int, int]] = []

        def warm() -> bool:
            """Ready; every answer before that recorded (readiness, liveness)."""
            try:
                ready, live = http_get(pod.port, "/healthz", 2), http_get(pod.port, "/livez", 2)
            except OSError:
                return False
            if ready[0] == 200:
                return True
            assert ready[1]["reason"] and not ready[1]["draining"], ready
            loading.append((ready[0], live[0]))
            return False

        try:
            wait_until(warm, 120, 0.1, "the pod's server is ready")
        except AssertionError as e:
            pytest.fail(f"{e}: {pod.tail()}")  # before close(): it removes the log
        # exec: the process the runtime signals is the server itself, not a shell around it.
        cmdline = Path(f"/proc/{pod.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and not cmdline[0].endswith(b"sh"), cmdline
        assert loading and all(r == 503 and l == 200 for r, l in loading), loading
        assert http_get(pod.port, "/livez")[0] == 200
        assert metric(pod.port, "chorus_load_ratio", None) == 0.0

        async def main():
            jfk = read_clip(DATA / "jfk.wav")
            url = f"ws://127.0.0.1:{pod.port}/v1/stream?language=en"
            async with connect(url, max_size=None) as s1:
                await async_wait_until(lambda: asyncio.to_thread(lambda: http_get(pod.port, "/healthz")[1]["sessions"] == 1),
                                       10, what="the first session is counted")
                half = await asyncio.to_thread(metric, pod.port, "chorus_load_ratio", None)
                async with connect(url, max_size=None) as s2:
                    full = await asyncio.to_thread(lambda: (metric(pod.port, "chorus_load_ratio", None),
                                                            http_get(pod.port, "/healthz"), http_get(pod.port, "/livez")))
                    # Mid-sentence on both, then SIGTERM: the open segments must be finalised.
                    await asyncio.gather(*(send_paced(ws, jfk[: 3 * 16000], 16000, 100, 8.0, encode=pcm16) for ws in (s1, s2)))
                    pod.signal(signal.SIGTERM)
                    draining = await asyncio.to_thread(readiness_once_draining, pod.port)
                    logs = await asyncio.gather(*(drain_messages(ws) for ws in (s1, s2)))
            return half, full, draining, logs

        half, (ratio_full, ready_full, live_full), (ready_drain, live_drain), logs = asyncio.run(main())
        rc = pod.wait(cfg.server.shutdown_timeout_s + 10)
        server_log = pod.tail()
    finally:
        pod.close()
    assert half == 0.5 and ratio_full == 1.0, (half, ratio_full)
    assert ready_full[0] == 503 and ready_full[1]["reason"] and live_full[0] == 200, (ready_full, live_full)
    assert ready_drain[0] == 503 and ready_drain[1]["draining"] is True and live_drain[0] == 200, (ready_drain, live_drain)
    for messages, code in logs:
        types = [m["type"] for m in messages]
        assert types[-1] == "done" and code == cfg.server.shutdown_close_code == 1012, (types, code)
        assert [m for m in messages if m["type"] == "final" and m["text"]], types
    assert rc == 0, server_log


def readiness_once_draining(port: int) -> tuple[tuple[int, dict], tuple[int, dict]]:
    """/healthz and /livez as soon as the server has taken the signal (the signal is delivered
    asynchronously: a request served just before it still sees the server full, not draining)."""
    def draining() -> tuple[int, dict] | None:
        ready = http_get(port, "/healthz")
        return ready if ready[1].get("draining") else None

    return wait_until(draining, 5, 0.01, "readiness says draining after SIGTERM"), http_get(port, "/livez")


async def drain_messages(ws) -> tuple[list[dict], int | None]:
    messages = []
    try:
        async for raw in ws:
            messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return messages, ws.close_code
