"""Lays out, under a temporary root, the files the gateway container would see in its pod,
from rendered manifests (helm template / kubectl kustomize output), so that
`imap-gateway check-config` can check the rendered configuration as it will be mounted.

usage: python pod_layout.py MANIFESTS.yaml ROOT [--routing-fallback FILE]

For the gateway container of the Deployment: every volumeMount is made a directory under
ROOT; a ConfigMap volume gets the rendered ConfigMap's items (one that is not rendered, such
as routing.existingConfigMap, gets --routing-fallback as the routing table), a Secret volume
gets placeholder files (its items, or tls.crt and tls.key; check-config only checks that they
exist), an emptyDir stays empty. Absolute paths in the configuration and routing table are
prefixed with ROOT. Fails on a subPath mount (never updated by the kubelet). Prints the path
of the configuration file under ROOT.
"""
import argparse
import os
import re
import sys

import yaml

PATH_KEYS = r"(routing_table|tls_cert|tls_key|token_file|master_password_file|passdb|ca_file)"


def fail(msg):
    sys.exit(f"pod_layout: {msg}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifests")
    ap.add_argument("root")
    ap.add_argument("--routing-fallback")
    a = ap.parse_args()
    root = os.path.abspath(a.root)

    with open(a.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if len(deployments) != 1:
        fail(f"expected one Deployment, found {len(deployments)}")
    pod = deployments[0]["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "imap-gateway"]
    if not containers:
        fail("no container named imap-gateway")
    c = containers[0]
    args = c.get("args", [])
    if "--config" not in args:
        fail("container args have no --config")
    config_path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def write(path, text):
        full = root + path
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)

    for m in c.get("volumeMounts", []):
        if "subPath" in m or "subPathExpr" in m:
            fail(f"volumeMount {m['name']} uses subPath: the kubelet never updates it")
        mount = m["mountPath"].rstrip("/")
        os.makedirs(root + mount, exist_ok=True)
        v = volumes.get(m["name"]) or fail(f"volumeMount {m['name']} has no volume")
        if "configMap" in v:
            name = v["configMap"]["name"]
            data = configmaps.get(name)
            if data is None:
                # Not rendered (an existing ConfigMap): filled in below, once the
                # configuration tells where the routing table is.
                continue
            for item in v["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                write(f"{mount}/{item['path']}", data[item["key"]])
        elif "secret" in v:
            items = v["secret"].get("items") or [{"path": "tls.crt"}, {"path": "tls.key"}]
            for item in items:
                write(f"{mount}/{item['path']}", "placeholder\n")
        elif "emptyDir" not in v:
            fail(f"volume {m['name']}: unexpected type {sorted(v)}")

    if not os.path.isfile(root + config_path):
        fail(f"{config_path} is not provided by any mounted ConfigMap")
    with open(root + config_path) as f:
        config = f.read()
    rt = re.search(r'^routing_table\s*=\s*"([^"]+)"', config, re.M)
    routing_path = rt.group(1) if rt else os.path.join(os.path.dirname(config_path), "routing.toml")
    if not os.path.isfile(root + routing_path):
        if not a.routing_fallback:
            fail(f"routing table {routing_path} is not provided by any rendered ConfigMap")
        if not any(routing_path.startswith(m["mountPath"].rstrip("/") + "/") for m in c["volumeMounts"]):
            fail(f"routing table {routing_path} is not under any volumeMount")
        with open(a.routing_fallback) as f:
            write(routing_path, f.read())

    # Absolute paths in the files point into the pod: move them under ROOT.
    for dirpath, _, files in os.walk(root):
        for fn in files:
            if not fn.endswith(".toml"):
                continue
            p = os.path.join(dirpath, fn)
            with open(p) as f:
                text = f.read()
            text = re.sub(r'^(\s*' + PATH_KEYS + r'\s*=\s*")/', lambda m: m.group(1) + root + "/", text, flags=re.M)
            with open(p, "w") as f:
                f.write(text)
    print(root + config_path)


if __name__ == "__main__":
    main()
