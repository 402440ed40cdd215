"""Validates Kubernetes and Istio manifests (make validate-manifests).

Every YAML document in the files or directories given is checked against the schemas of
its kind:
  - built-in kinds (apps/v1 Deployment, v1 Service, ...) with kubernetes-validate in strict
    mode (unknown fields are errors, as with `kubectl apply --validate=strict`), for the
    Kubernetes version given by --k8s-version;
  - Istio kinds (*.istio.io) with scripts/istio-validate.mjs (the @kubernetes-models/istio
    validators generated from Istio's CRDs, plus a TypeScript check for unknown fields).
A document with no apiVersion/kind, or a kind neither knows, is an error.

With --expect-invalid every document must FAIL (the test of the validators themselves: a
validator that passes everything would let anything through).

Run with .tools/venv/bin/python (scripts/setup installs kubernetes-validate and PyYAML there).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
ISTIO_GROUPS = (".istio.io/",)


def documents(paths):
    """Yields (label, doc) for every non-empty YAML document under `paths`."""
    files = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml"))
        elif p.exists():
            files.append(p)
        else:
            raise SystemExit(f"validate-manifests: {p}: no such file or directory")
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            yield f"{f}", {"__yaml_error__": str(e)}
            continue
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            yield f"{f}#{i} {kind}/{name}", doc


def kubernetes_errors(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "(document)"
        return [f"{where}: {e.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError):
        return [f"no Kubernetes {version} schema for {doc['apiVersion']} {doc['kind']}"]


def istio_errors(items):
    """items: [(id, doc)] -> {id: [errors]} through the node script."""
    if not items:
        return {}
    tools = ROOT / ".tools" / "node"
    out = subprocess.run(
        ["node", str(ROOT / "scripts" / "istio-validate.mjs")],
        input=json.dumps([{"id": i, "doc": d} for i, d in items]),
        capture_output=True,
        text=True,
        env={**os.environ, "GRAYLANE_NODE_TOOLS": str(tools)},
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"validate-manifests: istio-validate.mjs failed:\n{out.stderr}")
    return {r["id"]: r["errors"] for r in json.loads(out.stdout)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--k8s-version", default="1.33")
    ap.add_argument("--expect-invalid", action="store_true")
    args = ap.parse_args()

    results = {}
    istio = []
    for label, doc in documents(args.paths):
        if not isinstance(doc, dict) or "__yaml_error__" in doc:
            results[label] = [f"not a mapping: {doc.get('__yaml_error__') if isinstance(doc, dict) else doc!r}"]
        elif not doc.get("apiVersion") or not doc.get("kind"):
            results[label] = ["no apiVersion or kind"]
        elif any(g in str(doc["apiVersion"]) for g in ISTIO_GROUPS):
            results[label] = None
            istio.append((label, doc))
        else:
            results[label] = kubernetes_errors(doc, args.k8s_version)
    results.update(istio_errors(istio))

    bad = 0
    for label, errors in results.items():
        if args.expect_invalid:
            if errors:
                print(f"ok  rejected {label}: {errors[0].splitlines()[0]}")
            else:
                print(f"FAIL accepted {label}, which is invalid", file=sys.stderr)
                bad += 1
        elif errors:
            for e in errors:
                print(f"FAIL {label}: {e}", file=sys.stderr)
            bad += 1
        else:
            print(f"ok  {label}")
    if not results:
        print("validate-manifests: no documents found", file=sys.stderr)
        return 1
    what = "accepted (should fail)" if args.expect_invalid else "invalid"
    print(f"{len(results) - bad} passed, {bad} failed ({len(results)} documents; {what}: {bad})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
