"""The Helm chart (helm/imm-router): renders, lints, validates against Kubernetes 1.30, is hardened,
refuses values whose pods would crash for want of a Secret, passes the router's own topics and the
HTTP API token (from the Secret only) through, and mounts a config + rules + templates set that
`imm-router check` accepts.

No cluster and no helm binary: helm-python-sdk renders and lints in-process, kubernetes-validate
checks manifests offline. Everything here takes well under a second except the `check` subprocesses.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import trustme
import yaml

from router.config import KafkaSettings
from router.service import router_topics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "imm-router"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "imm", "ops"
FULLNAME = f"{RELEASE}-imm-router"
# Kinds whose schemas kubernetes-validate does not ship (CRDs): checked field by field below.
CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}
SECRET_KEY = re.compile(r"(?i)(passw|secret|token|credential|api_?key|private_?key|authorization)")
ENV_REF = re.compile(r"^((Bearer|Basic|Token) )?\$\{[A-Za-z_][A-Za-z0-9_]*\}$")

# Values for the extra channels: every template they need is supplied here, so this set does not
# depend on what the chart bundles under files/ (beyond the bundled rule's alerts-topic channel).
EXTRA_RULES = {
    "team-a/page-oncall.yaml": """\
rules:
  - name: team-a-moderation-block
    description: Content moderation suggests blocking.
    events: ["imm:Task:ImageModeration", "imm:Task:VideoModeration"]
    when: "imm.moderation.suggestion == 'block'"
    severity: critical
    notify:
      - channel: oncall-dingtalk
        template: dingtalk/oncall.md.j2
      - channel: ops-email
        template: email/oncall.j2
      - channel: audit-hook
        template: webhook/audit.json.j2
""",
}
EXTRA_TEMPLATES = {
    "dingtalk/oncall.md.j2": """\
{% block title %}{{ severity_icon[rule.severity] }} {{ rule.name }}{% endblock %}
{% block text %}
### {{ rule.name }}
- Project: {{ imm.project or "-" }}
- Event: {{ event.type }} {{ event.id }}
{% endblock %}
""",
    "email/oncall.j2": """\
{% block subject %}[{{ rule.severity }}] {{ rule.name }} {{ imm.project or "" }}{% endblock %}
{% block text %}{{ rule.description }}
Event {{ event.id }} ({{ event.type }}) at {{ event.time | localtime }}.
{% endblock %}
{% block html %}<p>{{ rule.description }}</p><p>Event {{ event.id }}</p>{% endblock %}
""",
    "webhook/audit.json.j2": """\
{% block body %}{{ {"rule": rule.name, "event": event.id, "imm": imm} | json }}{% endblock %}
""",
    "digest/dingtalk.j2": """\
{% block title %}{{ count }} IMM alerts held back{% endblock %}
{% block text %}{% for a in alerts %}- {{ a.summary }}
{% endfor %}{% endblock %}
""",
    "digest/email.j2": """\
{% block subject %}{{ count }} IMM alerts held back{% endblock %}
{% block text %}{% for a in alerts %}{{ a.summary }}
{% endfor %}{% endblock %}
""",
    "digest/webhook.j2": """\
{% block body %}{{ {"digest": count, "rules": rules} | json }}{% endblock %}
""",
}

COMMON_ON: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.com/ops/imm-router", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "acr-pull"}],
    "router": {
        "drainTimeoutSeconds": 40,
        "terminationGraceMarginSeconds": 15,
        "logLevel": "DEBUG",
        "timezone": "Asia/Shanghai",
        "httpPort": 9090,
        "apiTokenKey": "API_TOKEN",
    },
    "kafka": {
        "bootstrapServers": "b-1.kafka:9093,b-2.kafka:9093",
        "topics": ["imm-events", "imm-mns"],
        "groupId": "imm-router-prod",
        "deadLetterTopic": "imm-router-prod-dlq",
        "notificationsTopic": "imm-router-prod-notifications",
        "notificationsPartitions": 24,
        "changelogTopic": "imm-router-prod-changelog",
        "silencesTopic": "imm-router-prod-silences",
        "inhibitionsTopic": "imm-router-prod-inhibitions",
        "replicationFactor": 3,
        "securityProtocol": "SASL_SSL",
        "sasl": {"enabled": True, "mechanism": "SCRAM-SHA-512"},
        "tls": {"caSecret": "kafka-ca", "caKey": "ca.pem"},
    },
    "channels": {
        "oncall-dingtalk": {
            "type": "dingtalk",
            "url": "https://oapi.dingtalk.com/robot/send?access_token=${DINGTALK_TOKEN}",
            "secret": "${DINGTALK_SECRET}",
        },
        "ops-email": {
            "type": "email",
            "host": "smtp.example.com",
            "port": 587,
            "tls": "starttls",
            "username": "alerts",
            "password": "${SMTP_PASSWORD}",
            "from": "IMM Router <alerts@example.com>",
            "to": ["oncall@example.com"],
        },
        "audit-hook": {
            "type": "webhook",
            "url": "https://hooks.example.com/imm",
            "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"},
            "hmac_secret": "${HOOK_SECRET}",
        },
    },
    "config": {
        "kafka": {"auto_offset_reset": "latest", "client_id": "imm-router-prod"},
        "service": {"max_in_flight": 1000},
    },
    "rules": {"files": EXTRA_RULES, "includeBundled": True},
    "templates": {"files": EXTRA_TEMPLATES, "includeBundled": True},
    "existingSecret": "imm-router-secrets",
    "envFrom": [{"configMapRef": {"name": "imm-router-extra-env"}}],
    "env": [
        {"name": "PYTHONFAULTHANDLER", "value": "1"},
        {
            "name": "ROUTER_CHANNELS__OPS_EMAIL__PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "smtp", "key": "password"}},
        },
    ],
    "serviceAccount": {"enabled": True, "name": "imm-router", "annotations": {"owner": "ops"}},
    "podAnnotations": {"team": "media"},
    "podLabels": {"team": "media"},
    "probes": {"startup": {"enabled": True, "failureThreshold": 60}},
    "service": {"port": 80, "annotations": {"a": "b"}},
    "ingest": {
        "mns": {"enabled": True},
        "eventbridge": {"enabled": True, "tokenEnv": "EB_TOKEN", "hmacKeyEnv": "EB_HMAC_KEY"},
        "alertmanager": {"enabled": True, "tokenEnv": "AM_TOKEN"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "1m"},
            "host": "imm-ingest.example.com",
            "tls": [{"secretName": "imm-ingest-tls", "hosts": ["imm-ingest.example.com"]}],
        },
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "networkPolicy": {
        "enabled": True,
        "allowAllEgress": False,
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ],
        "egress": [
            {
                "ports": [
                    {"port": 9093, "protocol": "TCP"},
                    {"port": 587, "protocol": "TCP"},
                    {"port": 443, "protocol": "TCP"},
                ]
            }
        ],
    },
    "extraVolumes": [{"name": "smtp-ca", "secret": {"secretName": "smtp-ca"}}],
    "extraVolumeMounts": [{"name": "smtp-ca", "mountPath": "/etc/imm-router/smtp-ca", "readOnly": True}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "imm-router"}},
                    },
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "imm-router"}},
        }
    ],
    "priorityClassName": "ops-critical",
}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# The chart's defaults plus the one value they require: the default channels read ${DINGTALK_TOKEN},
# ${DINGTALK_SECRET} and ${SMTP_PASSWORD}, so without a Secret the chart refuses to render.
DEFAULTS: dict[str, Any] = {"existingSecret": "imm-router-secrets"}

# Opting out of secrets: only the Kafka channel, with a rule that notifies it. Starts with no Secret.
NO_SECRETS: dict[str, Any] = {
    "channels": {"oncall-dingtalk": None, "ops-email": None},
    "rules": {
        "files": {
            "failures.yaml": """\
rules:
  - name: any-failure
    when: "imm.outcome == 'failed'"
    notify:
      - channel: alerts-topic
        template: kafka/alert.json.j2
""",
        }
    },
}

# HPA and KEDA exclude each other, so "everything on" comes in two flavours.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": DEFAULTS,
    "no-secrets": NO_SECRETS,
    "all-on-keda": merged(
        COMMON_ON,
        {
            "keda": {
                "enabled": True,
                "authenticationRef": {"name": "kafka-auth"},
                "minReplicaCount": 1,
                "maxReplicaCount": 8,
            }
        },
    ),
    "all-on-hpa": merged(COMMON_ON, {"autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80}}),
}

# Environment the `check` subprocess gets for the ${VAR}s above (as existingSecret would provide).
SECRET_ENV = {
    "DINGTALK_TOKEN": "t0ken",
    "DINGTALK_SECRET": "SECabc",
    "SMTP_PASSWORD": "pw",
    "HOOK_TOKEN": "h",
    "HOOK_SECRET": "hs",
    "KAFKA_USERNAME": "imm",
    "KAFKA_PASSWORD": "kpw",
    "API_TOKEN": "api",
    "EB_TOKEN": "ebt",
    "EB_HMAC_KEY": "ebk",
    "AM_TOKEN": "amt",
}


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders (NOTES.txt excluded), parsed."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def router_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["router.yaml"])
    return cfg


def config_path(docs: list[dict[str, Any]]) -> str:
    args = container(docs)["args"]
    assert args[:2] == ["run", "--config"], args
    path: str = args[2]
    return path


def walk(value: Any, path: str = "") -> Any:
    """(path, key, value) for every mapping entry, recursively."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, key, item
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, f"{path}[{i}]")


# --- render, lint, validate -----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(variant: str) -> None:
    report = helm_python.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [], report
    # Severity 1 is informational ("icon is recommended"); warnings (2) and errors (3) fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes(chart: helm_python.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant])
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        if doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # test_crds_have_required_fields
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


def test_default_render_is_minimal(chart: helm_python.Chart) -> None:
    docs = render(chart, DEFAULTS)
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    assert one(docs, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "selector": one(docs, "Deployment")["spec"]["selector"],
    }


def test_every_optional_piece_renders(chart: helm_python.Chart) -> None:
    keda = render(chart, VARIANTS["all-on-keda"])
    hpa = render(chart, VARIANTS["all-on-hpa"])
    optional = {"ScaledObject", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Ingress"}
    assert optional <= kinds(keda)
    assert "HorizontalPodAutoscaler" not in kinds(keda)
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"} <= kinds(hpa)
    assert "ScaledObject" not in kinds(hpa)
    for docs in (keda, hpa):  # the autoscaler owns the replica count
        assert "replicas" not in one(docs, "Deployment")["spec"]
    off = render(
        chart, merged(DEFAULTS, {"podDisruptionBudget": {"enabled": False}, "serviceAccount": {"enabled": False}})
    )
    assert not kinds(off) & {"PodDisruptionBudget", "ServiceAccount"}
    assert pod_spec(off)["serviceAccountName"] == "default"


def test_crds_have_required_fields(chart: helm_python.Chart) -> None:
    docs = render(chart, VARIANTS["all-on-keda"])
    service = one(docs, "Service")
    deployment = one(docs, "Deployment")
    cfg = router_config(docs)

    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    scaled = one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 8)
    triggers = spec["triggers"]
    assert [t["metadata"]["topic"] for t in triggers] == cfg["kafka"]["topics"] == ["imm-events", "imm-mns"]
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= meta.keys()
        assert all(isinstance(v, str) for v in meta.values()), meta  # KEDA metadata is map[string]string
        # The scaler watches the very group the replicas share.
        assert meta["consumerGroup"] == cfg["kafka"]["group_id"] == "imm-router-prod"
        assert meta["bootstrapServers"] == cfg["kafka"]["bootstrap_servers"]
        assert meta["offsetResetPolicy"] == cfg["kafka"]["auto_offset_reset"] == "latest"
        assert int(meta["lagThreshold"]) > 0
        assert trigger["authenticationRef"] == {"name": "kafka-auth", "kind": "TriggerAuthentication"}


def test_hpa_and_keda_together_fail_with_a_clear_message(chart: helm_python.Chart) -> None:
    values = merged(VARIANTS["all-on-keda"], {"autoscaling": {"enabled": True}})
    message = r"autoscaling\.enabled and keda\.enabled are mutually exclusive"
    with pytest.raises(helm_python.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- no Secret, no pods that crash ---------------------------------------------------------

REFUSAL = re.compile(
    r"existingSecret is not set: create a Secret holding the keys (?P<keys>[A-Za-z0-9_.-]+(?:, [A-Za-z0-9_.-]+)*)"
    r" \(needed by (?P<users>[^)]+)\) and set existingSecret to its name; without them the pods cannot start\."
)


def refusal(chart: helm_python.Chart, values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The keys and the values needing them that the refusal names; the message is one line."""
    with pytest.raises(helm_python.HelmRenderError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(info.value)
    assert "\n" not in message, message
    match = REFUSAL.search(message)
    assert match, message
    return match["keys"].split(", "), match["users"].split(", ")


def test_defaults_refuse_naming_existing_secret_and_its_keys(chart: helm_python.Chart) -> None:
    keys, users = refusal(chart, {})
    assert keys == ["DINGTALK_SECRET", "DINGTALK_TOKEN", "SMTP_PASSWORD"]
    assert users == ["channels.oncall-dingtalk", "channels.ops-email"]
    # The keys are exactly the ${VAR}s of the config that renders once the Secret is named ...
    text = one(render(chart, DEFAULTS), "ConfigMap", f"{FULLNAME}-config")["data"]["router.yaml"]
    assert sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))) == keys
    # ... and the README quotes the message word for word.
    readme = (CHART / "README.md").read_text()
    assert f"existingSecret is not set: create a Secret holding the keys {', '.join(keys)} (needed by" in readme


@pytest.mark.parametrize(
    ("values", "keys", "users"),
    [
        (  # SASL credentials come from the Secret too
            {
                "kafka": {"securityProtocol": "SASL_SSL", "sasl": {"enabled": True}},
                "channels": {"oncall-dingtalk": None},
            },
            ["KAFKA_PASSWORD", "KAFKA_USERNAME", "SMTP_PASSWORD"],
            ["channels.ops-email", "kafka.sasl"],
        ),
        (  # a variable `env` sets is not needed from the Secret; a ${VAR:-default} never is
            {
                "env": [{"name": "SMTP_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "smtp", "key": "pw"}}}],
                "channels": {"ops-email": {"host": "${SMTP_HOST:-smtp.example.com}"}},
            },
            ["DINGTALK_SECRET", "DINGTALK_TOKEN"],
            ["channels.oncall-dingtalk"],
        ),
        (  # references in the free-form config count
            {**NO_SECRETS, "config": {"kafka": {"ssl_keyfile": "/etc/${KEY_DIR}/key.pem"}}},
            ["KEY_DIR"],
            ["config"],
        ),
        (  # the API token is read from existingSecret by key, even when envFrom supplies the rest
            {"router": {"apiTokenKey": "API_TOKEN"}, "envFrom": [{"secretRef": {"name": "other"}}]},
            ["API_TOKEN"],
            ["router.apiTokenKey"],
        ),
        ({**NO_SECRETS, "router": {"apiTokenKey": "API_TOKEN"}}, ["API_TOKEN"], ["router.apiTokenKey"]),
    ],
    ids=["sasl", "env-and-defaults", "config", "api-token-with-envFrom", "api-token"],
)
def test_refusal_names_the_keys_the_config_needs(
    chart: helm_python.Chart, values: dict[str, Any], keys: list[str], users: list[str]
) -> None:
    assert refusal(chart, values) == (keys, users)
    # Naming the Secret is all it takes.
    render(chart, merged(values, DEFAULTS))


def test_config_without_secrets_renders_without_a_secret(chart: helm_python.Chart) -> None:
    docs = render(chart, NO_SECRETS)
    assert set(router_config(docs)["channels"]) == {"alerts-topic"}
    assert "envFrom" not in container(docs) and "env" not in container(docs)
    # envFrom sources are trusted to provide the variables: the chart cannot see their keys.
    render(chart, {"envFrom": [{"secretRef": {"name": "my-env"}}]})


def test_notes_list_the_keys_the_pods_read(chart: helm_python.Chart) -> None:
    notes = chart.render(COMMON_ON, name=RELEASE, namespace=NAMESPACE)
    (text,) = [t for path, t in notes.items() if path.endswith("NOTES.txt")]
    assert "keys of Secret imm-router-secrets" in text
    for key in ("API_TOKEN", "DINGTALK_TOKEN", "HOOK_SECRET", "HOOK_TOKEN", "KAFKA_PASSWORD", "KAFKA_USERNAME"):
        assert key in text, key
    assert "SMTP_PASSWORD" in text  # the env override of the password does not replace ${SMTP_PASSWORD}


# --- the router's own topics and the HTTP API token -----------------------------------------

TOPIC_VALUES = {
    "notificationsTopic": "notifications_topic",
    "notificationsPartitions": "notifications_partitions",
    "changelogTopic": "changelog_topic",
    "silencesTopic": "silences_topic",
    "inhibitionsTopic": "inhibitions_topic",
    "replicationFactor": "replication_factor",
}


def test_chart_topic_defaults_are_the_routers(chart: helm_python.Chart) -> None:
    kafka = router_config(render(chart, DEFAULTS))["kafka"]
    defaults = KafkaSettings()
    for key in TOPIC_VALUES.values():
        assert kafka[key] == getattr(defaults, key), key
    assert kafka["dead_letter_topic"] == defaults.dead_letter_topic


@pytest.mark.parametrize("variant", ["all-on-keda", "all-on-hpa"])
def test_topic_values_reach_the_router_config(chart: helm_python.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant])
    kafka = router_config(docs)["kafka"]
    for value, key in TOPIC_VALUES.items():
        assert kafka[key] == COMMON_ON["kafka"][value], key
    assert kafka["notifications_partitions"] == 24 and kafka["replication_factor"] == 3
    notes = chart.render(VARIANTS[variant], name=RELEASE, namespace=NAMESPACE)
    (text,) = [t for path, t in notes.items() if path.endswith("NOTES.txt")]
    assert "imm-router-prod-notifications (24 partitions, delete), read by group imm-router-prod-notify" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"topics": ["imm-events", "imm-router-notifications"]}}, "kafka.topics must not contain"),
        ({"kafka": {"changelogTopic": "imm-router-notifications"}}, "must be five different topics"),
        ({"kafka": {"silencesTopic": "imm-router-dlq"}}, "must be five different topics"),
        (
            {
                "router": {"apiTokenKey": "API_TOKEN"},
                "env": [{"name": "ROUTER_HTTP__API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}}],
            },
            "keep only router.apiTokenKey",
        ),
    ],
)
def test_topic_and_token_mistakes_fail_with_a_clear_message(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(merged(DEFAULTS, values), name=RELEASE, namespace=NAMESPACE)


def test_api_token_comes_only_from_the_secret(chart: helm_python.Chart) -> None:
    docs = render(chart, merged(DEFAULTS, {"router": {"apiTokenKey": "API_TOKEN"}}))
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["ROUTER_HTTP__API_TOKEN"] == {
        "name": "ROUTER_HTTP__API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "imm-router-secrets", "key": "API_TOKEN"}},
    }
    assert "api_token" not in router_config(docs)["http"]
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert "api_token" not in yaml.safe_dump(doc.get("data") or {}), doc["metadata"]["name"]
    # Without apiTokenKey nothing sets it: silence writes are refused.
    assert "env" not in container(render(chart, DEFAULTS))
    # Every other way in is refused by the schema.
    for values, where in [
        ({"config": {"http": {"api_token": "${API_TOKEN}"}}}, "api_token"),
        ({"config": {"http": {"api_token": "s3cret"}}}, "api_token"),
        ({"router": {"apiToken": "s3cret"}}, "apiToken"),
        ({"env": [{"name": "ROUTER_HTTP__API_TOKEN", "value": "s3cret"}]}, "/env/0"),
    ]:
        with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
            chart.render(merged(DEFAULTS, values), name=RELEASE, namespace=NAMESPACE)


def test_ingest_is_off_by_default(chart: helm_python.Chart) -> None:
    docs = render(chart, merged(DEFAULTS, {"networkPolicy": {"enabled": True}}))
    assert "Ingress" not in kinds(docs)
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http"]
    assert "ingest" not in router_config(docs)  # the router's own default: both endpoints off
    assert len(one(docs, "NetworkPolicy")["spec"]["ingress"]) == 1


def test_ingest_exposes_only_its_paths_with_tls_and_secrets_by_reference(chart: helm_python.Chart) -> None:
    docs = render(chart, VARIANTS["all-on-hpa"])
    ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert ports["ingest"]["targetPort"] == "http" == container(docs)["ports"][0]["name"]
    ingress = one(docs, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"secretName": "imm-ingest-tls", "hosts": ["imm-ingest.example.com"]}]
    (rule,) = ingress["rules"]
    assert rule["host"] == "imm-ingest.example.com"
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [
        ("/ingest/mns", "Exact"),
        ("/ingest/eventbridge", "Exact"),
        ("/ingest/alertmanager", "Exact"),
    ]  # never /metrics or the silences API
    assert {p["backend"]["service"]["port"]["name"] for p in rule["http"]["paths"]} == {"ingest"}
    policy = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert policy[1] == {
        "ports": [{"port": "http", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
    }
    cfg = router_config(docs)["ingest"]
    assert cfg["mns"] == {"enabled": True, "cert_url_prefixes": ["https://mnstest.oss-cn-hangzhou.aliyuncs.com/"]}
    assert cfg["eventbridge"]["token"] == "${EB_TOKEN}" and cfg["eventbridge"]["hmac_key"] == "${EB_HMAC_KEY}"
    assert cfg["alertmanager"] == {"enabled": True, "token": "${AM_TOKEN}"}
    only_mns = render(chart, merged(DEFAULTS, {"ingest": {"mns": {"enabled": True}, "ingress": {"enabled": True}}}))
    assert [p["path"] for p in one(only_mns, "Ingress")["spec"]["rules"][0]["http"]["paths"]] == ["/ingest/mns"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"ingest": {"eventbridge": {"enabled": True}}},
            "ingest.eventbridge.enabled needs ingest.eventbridge.tokenEnv",
        ),
        (
            {"ingest": {"alertmanager": {"enabled": True}}},
            "ingest.alertmanager.enabled needs ingest.alertmanager.tokenEnv",
        ),
        ({"ingest": {"ingress": {"enabled": True}}}, "ingest.ingress.enabled needs ingest.mns.enabled"),
    ],
)
def test_ingest_mistakes_fail_with_a_clear_message(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(merged(DEFAULTS, values), name=RELEASE, namespace=NAMESPACE)
    for values, where in [
        ({"config": {"ingest": {"mns": {"enabled": True}}}}, "ingest"),
        ({"ingest": {"mns": {"certUrlPrefixes": ["http://mnstest.example/"]}}}, "certUrlPrefixes"),
        ({"ingest": {"eventbridge": {"token": "s3cret"}}}, "token"),
        ({"ingest": {"alertmanager": {"token": "s3cret"}}}, "token"),
    ]:
        with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
            chart.render(merged(DEFAULTS, values), name=RELEASE, namespace=NAMESPACE)


def test_readme_topic_commands_match_what_the_router_creates() -> None:
    readme = (CHART / "README.md").read_text().replace("\\\n", " ")
    defaults = KafkaSettings()
    documented: dict[str, tuple[int, bool]] = {}
    for line in readme.splitlines():
        match = re.match(r'create --topic (\S+) --partitions "?(\$PARTS|\d+)"? .*cleanup\.policy=(\w+)', line.strip())
        if match:
            partitions = defaults.notifications_partitions if match[2] == "$PARTS" else int(match[2])
            documented[match[1]] = (partitions, match[3] == "compact")
    assert "PARTS=12 " in readme and defaults.notifications_partitions == 12
    expected = {name: (spec.partitions, spec.compact) for name, spec in router_topics(defaults).items()}
    assert documented == expected
    for name in expected:  # and each is in the table of settings
        assert f"`{name}`" in readme, name


# --- hardening ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_is_hardened(chart: helm_python.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant])
    pod = pod_spec(docs)
    ctr = container(docs)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = ctr["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert ctr["resources"]["requests"] and ctr["resources"]["limits"]["memory"]

    cfg = router_config(docs)
    (port,) = ctr["ports"]
    assert port["name"] == "http" and port["containerPort"] == cfg["http"]["port"]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert ctr["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    # The only writable place is an emptyDir at /tmp.
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    for mount in ctr["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount, mount  # subPath breaks updates
        if mount["mountPath"] != "/tmp":
            assert mount["readOnly"] is True, mount


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_is_drain_deadline_plus_margin(chart: helm_python.Chart, variant: str) -> None:
    values = chart.merge_values(VARIANTS[variant])
    docs = render(chart, VARIANTS[variant])
    drain = router_config(docs)["service"]["drain_timeout_seconds"]
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert drain == values["router"]["drainTimeoutSeconds"]
    assert grace == drain + values["router"]["terminationGraceMarginSeconds"]
    assert grace - drain >= 5


def test_config_change_rolls_pods_but_rules_and_templates_do_not(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        docs = render(chart, merged(DEFAULTS, values))
        annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    router_yaml = one(render(chart, DEFAULTS), "ConfigMap", f"{FULLNAME}-config")["data"]["router.yaml"]
    assert base == hashlib.sha256(router_yaml.rstrip("\n").encode()).hexdigest()
    assert checksum({"router": {"logLevel": "DEBUG"}}) != base
    assert checksum({"channels": {"extra": {"type": "kafka", "topic": "x"}}}) != base
    assert checksum({"rules": {"files": EXTRA_RULES}}) == base
    assert checksum({"templates": {"files": EXTRA_TEMPLATES}}) == base


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_only_by_reference(chart: helm_python.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant])
    assert "Secret" not in kinds(docs)
    for path, key, value in walk(router_config(docs)):
        # ingest's token_header / hmac_header name a header: not secrets.
        if isinstance(key, str) and SECRET_KEY.search(key) and not key.endswith("_header"):
            assert isinstance(value, str) and ENV_REF.match(value), f"{path}.{key}: {value!r}"
    for env in container(docs).get("env", []):
        if SECRET_KEY.search(env["name"]):
            assert "value" not in env, env
    if VARIANTS[variant].get("existingSecret"):
        assert {"secretRef": {"name": "imm-router-secrets"}} in container(docs)["envFrom"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCont": 3}, "replicaCont"),  # typos at the top level
        ({"kafka": {"saslPassword": "x"}}, "saslPassword"),
        ({"channels": {"mail": {"type": "email", "password": "hunter2"}}}, "/channels/mail/password"),
        (
            {
                "channels": {
                    "dt": {
                        "type": "dingtalk",
                        "secret": "SECxyz",
                        "url": "https://oapi.dingtalk.com/robot/send?access_token=${T}",
                    }
                }
            },
            "/secret",
        ),
        (
            {
                "channels": {
                    "dt": {"type": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=abc123"}
                }
            },
            "/url",
        ),
        ({"channels": {"hook": {"type": "webhook", "url": "https://u:p@hooks.example.com/x"}}}, "/url"),
        (
            {
                "channels": {
                    "hook": {"type": "webhook", "url": "https://h/x", "headers": {"Authorization": "Bearer abc"}}
                }
            },
            "Authorization",
        ),
        ({"config": {"kafka": {"sasl_password": "x"}}}, "sasl_password"),
        ({"config": {"extra": [{"client_secret": "x"}]}}, "client_secret"),
        ({"env": [{"name": "SMTP_PASSWORD", "value": "hunter2"}]}, "/env/0"),
        ({"config": {"rules_dir": "/elsewhere"}}, "rules_dir"),  # chart-managed keys
        ({"config": {"service": {"drain_timeout_seconds": 99}}}, "drain_timeout_seconds"),
        ({"channels": {"x": {"type": "slack"}}}, "type"),
        ({"rules": {"files": {"../escape.yaml": "rules: []"}}}, "../escape.yaml"),
        ({"config": {"kafka": {"notifications_topic": "x"}}}, "notifications_topic"),  # the router's own topics
        ({"config": {"kafka": {"replication_factor": 3}}}, "replication_factor"),
        ({"kafka": {"notificationsPartitions": 0}}, "notificationsPartitions"),
        ({"kafka": {"silencesTopic": "no spaces"}}, "silencesTopic"),
        ({"kafka": {"changelogTopic": ""}}, "changelogTopic"),
    ],
)
def test_schema_rejects(chart: helm_python.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_references(chart: helm_python.Chart) -> None:
    docs = render(
        chart,
        {
            "existingSecret": "imm-router-secrets",
            "channels": {"alerts-topic": None, "k": {"type": "kafka", "topic": "t"}},
            "env": [{"name": "SMTP_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
            "config": {"kafka": {"client_id": "x"}, "max_event_bytes": 65536},
        },
    )
    cfg = router_config(docs)
    assert "alerts-topic" not in cfg["channels"]  # null removes a default channel
    assert cfg["channels"]["k"] == {"type": "kafka", "topic": "t"}
    assert cfg["kafka"]["client_id"] == "x" and cfg["max_event_bytes"] == 65536


# --- rules and templates ConfigMaps ---------------------------------------------------------


def mounted_files(docs: list[dict[str, Any]], volume_name: str) -> dict[str, str]:
    """path -> content of a chart ConfigMap volume, as the kubelet would lay it out."""
    volume = {v["name"]: v for v in pod_spec(docs)["volumes"]}[volume_name]["configMap"]
    data = one(docs, "ConfigMap", volume["name"]).get("data") or {}
    items = volume.get("items") or [{"key": k, "path": k} for k in data]
    assert {i["key"] for i in items} == set(data), "every key is mounted, every item has a key"
    return {i["path"]: data[i["key"]] for i in items}


def bundled(kind: str) -> dict[str, str]:
    base = CHART / "files" / kind
    return {p.relative_to(base).as_posix(): p.read_text() for p in base.rglob("*") if p.is_file()}


def test_bundled_files_are_mounted_byte_for_byte(chart: helm_python.Chart) -> None:
    docs = render(chart, DEFAULTS)
    assert bundled("rules") and bundled("templates")
    assert mounted_files(docs, "rules") == bundled("rules")
    assert mounted_files(docs, "templates") == bundled("templates")
    for name in (f"{FULLNAME}-rules", f"{FULLNAME}-templates"):
        for key in one(docs, "ConfigMap", name)["data"]:
            assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), key  # ConfigMap keys cannot hold "/"
    assert "dingtalk__task-failed.md.j2" in one(docs, "ConfigMap", f"{FULLNAME}-templates")["data"]


def test_values_files_replace_or_extend_the_bundled_set(chart: helm_python.Chart) -> None:
    only = render(chart, merged(DEFAULTS, {"rules": {"files": EXTRA_RULES}, "templates": {"files": EXTRA_TEMPLATES}}))
    assert mounted_files(only, "rules") == EXTRA_RULES
    assert mounted_files(only, "templates") == EXTRA_TEMPLATES
    both = render(chart, VARIANTS["all-on-keda"])
    assert mounted_files(both, "rules") == {**bundled("rules"), **EXTRA_RULES}
    assert mounted_files(both, "templates") == {**bundled("templates"), **EXTRA_TEMPLATES}


def test_existing_configmaps_are_referenced_not_rendered(chart: helm_python.Chart) -> None:
    items = [{"key": "dingtalk__x.md.j2", "path": "dingtalk/x.md.j2"}]
    docs = render(
        chart,
        {
            **DEFAULTS,
            "rules": {"existingConfigMap": "my-rules"},
            "templates": {"existingConfigMap": "my-templates", "existingConfigMapItems": items},
        },
    )
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert names == {f"{FULLNAME}-config"}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["rules"]["configMap"] == {"name": "my-rules"}
    assert volumes["templates"]["configMap"] == {"name": "my-templates", "items": items}


# --- the mounted set passes `imm-router check` ----------------------------------------------


def materialize(docs: list[dict[str, Any]], root: Path) -> Path:
    """Write what the pod would see under ``root`` (ConfigMap volumes honouring items key->path,
    a throw-away CA for secret volumes) and return the config, its absolute paths re-rooted."""
    pod = pod_spec(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    ca = trustme.CA()
    for mount in container(docs)["volumeMounts"]:
        volume = volumes[mount["name"]]
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = configmaps[volume["configMap"]["name"]].get("data") or {}
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (target / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (target / item["path"]).write_text(data[item["key"]])
        elif "secret" in volume:
            for item in volume["secret"].get("items") or [{"path": "ca.crt"}]:
                ca.cert_pem.write_to_path(str(target / item["path"]))

    config_file = root / config_path(docs).lstrip("/")
    cfg = yaml.safe_load(config_file.read_text())
    mount_paths = {m["mountPath"] for m in container(docs)["volumeMounts"]}
    for key in ("rules_dir", "templates_dir"):
        assert cfg[key] in mount_paths, f"{key} {cfg[key]} is not a mounted directory"
        cfg[key] = str(root / cfg[key].lstrip("/"))
    if cfg["kafka"].get("ssl_cafile"):
        cfg["kafka"]["ssl_cafile"] = str(root / cfg["kafka"]["ssl_cafile"].lstrip("/"))
        assert Path(cfg["kafka"]["ssl_cafile"]).is_file()
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config_file


def shipped(kind: str) -> dict[str, str]:
    """The rules/templates the image ships (repo root), as values `files`."""
    base = ROOT / kind
    suffixes = (".yaml", ".yml") if kind == "rules" else (".j2", ".jinja", ".jinja2")
    return {p.relative_to(base).as_posix(): p.read_text() for p in base.rglob("*") if p.suffix in suffixes}


@pytest.mark.parametrize("variant", [*VARIANTS, "shipped-files"])
def test_mounted_config_passes_router_check(chart: helm_python.Chart, variant: str, tmp_path: Path) -> None:
    if variant == "shipped-files":
        # The repo's shipped rules and templates through values files with the default channels: what
        # the bundled copy becomes after `make chart-files`, and what an ops engineer starts from.
        values = {
            **DEFAULTS,
            "rules": {"files": shipped("rules")},
            "templates": {"files": shipped("templates")},
        }
        assert values["rules"]["files"] and values["templates"]["files"], "shipped rules/templates missing"
    else:
        values = VARIANTS[variant]
    docs = render(chart, values)
    for doc in docs:  # the API server refuses ConfigMaps over 1 MiB
        if doc["kind"] == "ConfigMap":
            assert len(yaml.safe_dump(doc.get("data") or {}).encode()) < 1_000_000, doc["metadata"]["name"]
    config_file = materialize(docs, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_") and k not in SECRET_ENV}
    if values.get("existingSecret"):  # else the config must start without any of them (no-secrets)
        env.update(SECRET_ENV)
    env.update(PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"imm-router check failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_workers_go_into_the_config_and_need_a_cpu_each(chart: helm_python.Chart) -> None:
    assert router_config(render(chart, DEFAULTS))["service"]["workers"] == 1
    two = merged(DEFAULTS, {"router": {"workers": 2}, "resources": {"requests": {"cpu": "2"}}})
    assert router_config(render(chart, two))["service"]["workers"] == 2
    assert router_config(render(chart, merged(two, {"resources": {"requests": {"cpu": "2500m"}}})))
    message = "router.workers is 2: request a CPU per worker process (resources.requests.cpu: 2 or more; it is 1500m)"
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(merged(two, {"resources": {"requests": {"cpu": "1500m"}}}), name=RELEASE, namespace=NAMESPACE)
