//! `graylane install`, run through the real CLI parser: the checked-in manifests under
//! deploy/ equal its output; the pod's assembled graylane.yaml is a valid config; tokens
//! appear only in the Secret; RBAC is least privilege; names, ports and paths agree across
//! documents and with the binary; every bad option is refused naming the flag. (The schemas
//! are checked by `make validate-manifests` on the same output.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use clap::Parser;
use graylane_control_plane::cli::{Cli, Verb};
use graylane_control_plane::config::{Config, Role};
use graylane_control_plane::install::{self, API_PORT, WASM_IN_IMAGE};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `graylane install ARGS` with `random` generating tokens; returns the YAML text.
fn install_with(
    args: &[&str],
    random: &mut dyn FnMut() -> Option<String>,
) -> Result<String, String> {
    let mut argv = vec!["graylane", "install"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let Verb::Install(a) = cli.command else {
        panic!("not install")
    };
    install::run(*a, random).map_err(|e| e.to_string())
}

fn counter() -> impl FnMut() -> Option<String> {
    let mut n = 0;
    move || {
        n += 1;
        Some(format!("generated-token-{n:04}-abcdefgh"))
    }
}

fn install(args: &[&str]) -> String {
    install_with(args, &mut counter()).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .flat_map(|d| d.split("---\n"))
        .filter(|d| {
            d.lines()
                .any(|l| !l.starts_with('#') && !l.trim().is_empty())
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let f = find(docs, kind);
    assert_eq!(f.len(), 1, "{kind}: {f:?}");
    f[0]
}

/// The checked-in files and the commands that make them (repository-relative).
fn checked_in() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "deploy/kubernetes/rbac.yaml",
            vec!["install", "--only", "rbac"],
        ),
        (
            "deploy/kubernetes/control-plane.yaml",
            vec![
                "install",
                "--only",
                "namespace",
                "--only",
                "config",
                "--only",
                "control-plane",
                "--services",
                "examples/seed-003.yaml",
            ],
        ),
        (
            "deploy/istio/wasmplugin.yaml",
            vec!["install", "--only", "plugin", "--plugin-port", "8080"],
        ),
        (
            "deploy/istio/seed-003.yaml",
            vec!["render", "istio", "--config", "examples/seed-003.yaml"],
        ),
    ]
}

/// deploy/ holds what the CLI prints, byte for byte. `GRAYLANE_BLESS=1` rewrites the files.
#[tokio::test]
async fn the_manifests_under_deploy_are_the_cli_output() {
    for (file, args) in checked_in() {
        let mut argv = vec!["graylane".to_string()];
        argv.extend(args.iter().map(|a| {
            if a.starts_with("examples/") {
                root().join(a).display().to_string()
            } else {
                (*a).to_string()
            }
        }));
        let out = graylane_control_plane::cli::run(Cli::try_parse_from(&argv).unwrap())
            .await
            .unwrap();
        let want = format!(
            "# Generated: `graylane {}`. Do not edit: control-plane/tests/install.rs checks that this\n\
             # file equals the command's output (GRAYLANE_BLESS=1 cargo test -p graylane-control-plane\n\
             # --test install rewrites it).\n{out}",
            args.join(" ")
        );
        let path = root().join(file);
        if std::env::var_os("GRAYLANE_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{file} is not the output of `graylane {}`; regenerate with GRAYLANE_BLESS=1",
            args.join(" ")
        );
    }
}

#[test]
fn the_pod_config_is_the_configmap_plus_the_secret_and_it_loads() {
    let yaml = install(&[
        "--services",
        &root().join("examples/seed-003.yaml").display().to_string(),
    ]);
    let d = docs(&yaml);
    let config = one(&d, "ConfigMap")["data"]["graylane.yaml"]
        .as_str()
        .unwrap();
    let tokens = one(&d, "Secret")["stringData"]["tokens.yaml"]
        .as_str()
        .unwrap();
    // What the initContainer does: cat graylane.yaml tokens.yaml > /run/graylane/graylane.yaml
    let init = &one(&d, "Deployment")["spec"]["template"]["spec"]["initContainers"][0];
    assert!(init["command"][2]
        .as_str()
        .unwrap()
        .contains("cat /etc/graylane/config/graylane.yaml /etc/graylane/tokens/tokens.yaml"));
    let joined = format!("{config}{tokens}");
    let cfg = Config::parse(&joined, Path::new("/run/graylane/graylane.yaml")).unwrap();
    assert_eq!(cfg.listen.to_string(), format!("0.0.0.0:{API_PORT}"));
    assert_eq!(cfg.xds_listen.unwrap().to_string(), "0.0.0.0:18000");
    assert_eq!(cfg.data_dir, Path::new("/var/lib/graylane"));
    assert_eq!(cfg.plugin.as_ref().unwrap().wasm, Path::new(WASM_IN_IMAGE));
    assert_eq!(
        cfg.tokens.iter().map(|t| t.role).collect::<Vec<_>>(),
        [Role::Write, Role::Read]
    );
    assert_eq!(cfg.services.keys().collect::<Vec<_>>(), ["a", "b"]);
    // The strategies arrive as written (a `Y` state stays a state, not a YAML boolean).
    let want = Config::load(&root().join("examples/seed-003.yaml")).unwrap();
    for (name, svc) in &want.services {
        assert_eq!(cfg.services[name].strategy, svc.strategy, "{name}");
    }
    assert_eq!(
        format!("{:?}", cfg.services["a"].discovery),
        format!("{:?}", want.services["a"].discovery)
    );
    // The pod template carries the ConfigMap's checksum: applying a changed one rolls the pod.
    let want: String = Sha256::digest(config.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        one(&d, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            ["graylane.io/config-sha256"],
        want.as_str()
    );
    // One WasmPlugin comes along, serving every service the control plane manages (the
    // file's and any added later): no service named.
    let wp = one(&d, "WasmPlugin");
    assert_eq!(wp["metadata"]["name"], "graylane");
    let config = wp["spec"]["pluginConfig"].as_object().unwrap();
    assert!(!config.contains_key("service") && !config.contains_key("services"));
}

/// `--manage-istio-routes` grants the RBAC and turns `istio.apply` on in the pod's config,
/// with the `istio:` options of the `--services` file; `istio.apply` in the file without the
/// flag (no RBAC for it) is refused.
#[test]
fn manage_istio_routes_turns_istio_apply_on_with_the_files_options() {
    let pod_config = |yaml: &str| {
        let d = docs(yaml);
        let config = one(&d, "ConfigMap")["data"]["graylane.yaml"]
            .as_str()
            .unwrap()
            .to_string();
        let tokens = one(&d, "Secret")["stringData"]["tokens.yaml"]
            .as_str()
            .unwrap()
            .to_string();
        Config::parse(
            &format!("{config}{tokens}"),
            Path::new("/run/graylane/graylane.yaml"),
        )
        .unwrap()
    };
    assert!(!pod_config(&install(&[])).istio.apply);
    let cfg = pod_config(&install(&["--manage-istio-routes"]));
    assert!(cfg.istio.apply);
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read_to_string(root().join("examples/seed-003.yaml")).unwrap();
    // Its strategies without its own istio: section.
    let seed = seed.split("\n# Istio routes").next().unwrap().to_string() + "\n";
    let file = dir.path().join("services.yaml");
    std::fs::write(
        &file,
        format!("{seed}istio:\n  services:\n    a: {{gateways: [istio-system/shop], hosts: [shop.example.com]}}\n"),
    )
    .unwrap();
    let services = file.display().to_string();
    let cfg = pod_config(&install(&[
        "--services",
        &services,
        "--manage-istio-routes",
    ]));
    assert!(cfg.istio.apply);
    assert_eq!(
        cfg.istio.options("a").unwrap().gateways,
        ["istio-system/shop"]
    );
    assert!(cfg.istio.options("b").unwrap().gateways.is_empty());
    let cfg = pod_config(&install(&["--services", &services]));
    assert!(!cfg.istio.apply, "no RBAC, no apply");
    std::fs::write(&file, format!("{seed}istio: {{apply: true}}\n")).unwrap();
    let e = install_with(&["--services", &services], &mut counter()).unwrap_err();
    assert!(e.contains("--manage-istio-routes"), "{e}");
}

/// Seed 003's cookie generator in a pod: `--cookie-key ID=FILE` puts the private key into the
/// Secret's `cookie_keys` (and nowhere else), with an issuer token for the auth service.
#[test]
fn cookie_keys_and_the_issuer_token_go_into_the_secret_only() {
    let key_file = root().join("examples/demo-cookie.key");
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    let arg = format!("demo={}", key_file.display());
    let yaml = install(&["--cookie-key", &arg]);
    let d = docs(&yaml);
    let secret = one(&d, "Secret")["stringData"]["tokens.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(yaml.matches(&key).count(), 1, "the key only in the Secret");
    assert!(secret.contains(&key));
    let config = one(&d, "ConfigMap")["data"]["graylane.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let cfg = Config::parse(
        &format!("{config}{secret}"),
        Path::new("/run/graylane/graylane.yaml"),
    )
    .unwrap();
    assert_eq!(cfg.cookie_generator.keys.ids(), ["demo"]);
    assert_eq!(
        cfg.tokens.iter().map(|t| t.role).collect::<Vec<_>>(),
        [Role::Write, Role::Read, Role::Issuer]
    );
    // Without keys, no issuer token unless asked for.
    let plain = pod_roles(&install(&[]));
    assert_eq!(plain, [Role::Write, Role::Read]);
    let asked = pod_roles(&install(&["--issuer-token", "issuer-token-0123456789"]));
    assert_eq!(asked, [Role::Write, Role::Read, Role::Issuer]);
    // A file that is not a key, a repeated id, or no Secret: refused naming the flag.
    let bad = format!("demo={}", root().join("README.md").display());
    for args in [
        vec!["--cookie-key", bad.as_str()],
        vec!["--cookie-key", &arg, "--cookie-key", &arg],
        vec!["--cookie-key", "demo"],
        vec!["--cookie-key", &arg, "--skip-secret"],
    ] {
        let e = install_with(&args, &mut counter()).unwrap_err();
        assert!(
            e.starts_with("--cookie-key") || e.starts_with("--skip-secret"),
            "{e}"
        );
        assert!(!e.contains(&key), "{e}");
    }
}

fn pod_roles(yaml: &str) -> Vec<Role> {
    let d = docs(yaml);
    let secret = one(&d, "Secret")["stringData"]["tokens.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config = one(&d, "ConfigMap")["data"]["graylane.yaml"]
        .as_str()
        .unwrap();
    Config::parse(
        &format!("{config}{secret}"),
        Path::new("/run/graylane/graylane.yaml"),
    )
    .unwrap()
    .tokens
    .iter()
    .map(|t| t.role)
    .collect()
}

#[test]
fn tokens_are_generated_or_given_and_appear_only_in_the_secret() {
    let mut calls = 0;
    let mut random = || {
        calls += 1;
        Some(format!("random-token-number-{calls}"))
    };
    let yaml = install_with(&["--service", "b"], &mut random).unwrap();
    assert_eq!(calls, 2, "a write and a read token");
    let d = docs(&yaml);
    for t in ["random-token-number-1", "random-token-number-2"] {
        let holders: Vec<&str> = d
            .iter()
            .filter(|doc| serde_saphyr::to_string(doc).unwrap().contains(t))
            .map(|doc| doc["kind"].as_str().unwrap())
            .collect();
        assert_eq!(holders, ["Secret"], "{t}");
    }
    // Given tokens are used as given; none is generated.
    let yaml = install_with(
        &[
            "--service",
            "b",
            "--write-token",
            "given-write-token-01",
            "--read-token",
            "given-read-token-001",
        ],
        &mut || panic!("no token should be generated"),
    )
    .unwrap();
    assert!(yaml.contains("given-write-token-01") && yaml.contains("given-read-token-001"));
    // No Secret at all when skipped (bring your own), and nothing generated.
    let yaml = install_with(&["--service", "b", "--skip-secret"], &mut || {
        panic!("no token should be generated")
    })
    .unwrap();
    assert!(find(&docs(&yaml), "Secret").is_empty());
    // A feed token must be in the WasmPlugin (the filter sends it) and in the Secret.
    let d = docs(&install(&[
        "--service",
        "b",
        "--feed-token",
        "feed-token-0123456789",
    ]));
    assert_eq!(
        one(&d, "WasmPlugin")["spec"]["pluginConfig"]["control_plane"]["token"],
        "feed-token-0123456789"
    );
    assert!(one(&d, "Secret")["stringData"]["tokens.yaml"]
        .as_str()
        .unwrap()
        .contains("feed_token: feed-token-0123456789"));
    // Nothing to generate with: the error names the flag.
    let e = install_with(&["--service", "b"], &mut || None).unwrap_err();
    assert!(e.contains("--write-token"), "{e}");
}

fn rules(d: &[Value]) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for r in one(d, "ClusterRole")["rules"].as_array().unwrap() {
        for res in r["resources"].as_array().unwrap() {
            out.push((
                r["apiGroups"][0].as_str().unwrap().to_string(),
                res.as_str().unwrap().to_string(),
                r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            ));
        }
    }
    out
}

#[test]
fn rbac_grants_reads_only_and_writes_only_when_asked() {
    let read = vec!["get".to_string(), "list".into(), "watch".into()];
    let d = docs(&install(&["--only", "rbac"]));
    assert_eq!(
        rules(&d),
        [
            (
                "discovery.k8s.io".into(),
                "endpointslices".into(),
                read.clone()
            ),
            ("".into(), "pods".into(), read.clone()),
        ]
    );
    let d = docs(&install(&["--only", "rbac", "--read-pods=false"]));
    assert_eq!(rules(&d).len(), 1);
    let d = docs(&install(&[
        "--only",
        "rbac",
        "--scale-deployments",
        "--manage-istio-routes",
    ]));
    let r = rules(&d);
    assert!(r.contains(&(
        "apps".into(),
        "deployments/scale".into(),
        vec!["get".into(), "patch".into()]
    )));
    // Only the scale subresource: nothing on the Deployments themselves.
    assert!(!r
        .iter()
        .any(|(g, res, _)| g == "apps" && res == "deployments"));
    // istio.apply's server-side apply: a PATCH, authorized as create too when the object
    // is new; nothing else on Istio's resources.
    let istio: Vec<_> = r
        .iter()
        .filter(|(g, _, _)| g == "networking.istio.io")
        .cloned()
        .collect();
    let write = vec!["create".to_string(), "patch".into()];
    assert_eq!(
        istio,
        [
            (
                "networking.istio.io".into(),
                "virtualservices".into(),
                write.clone()
            ),
            (
                "networking.istio.io".into(),
                "destinationrules".into(),
                write
            ),
        ]
    );
    // Never delete, never anything on secrets, never a wildcard.
    for (g, res, verbs) in r {
        assert!(
            !verbs.iter().any(|v| v == "delete" || v == "*"),
            "{g}/{res}"
        );
        assert!(res != "secrets" && res != "*" && g != "*", "{g}/{res}");
    }
    let d = docs(&install(&["--only", "rbac", "--namespace", "gl"]));
    assert_eq!(
        one(&d, "ClusterRoleBinding")["subjects"][0]["namespace"],
        "gl"
    );
    assert_eq!(one(&d, "ServiceAccount")["metadata"]["namespace"], "gl");
}

#[test]
fn names_ports_and_paths_agree_across_documents() {
    let d = docs(&install(&["--service", "b", "--namespace", "gl"]));
    // Every namespaced resource but the WasmPlugin is in the control plane's namespace.
    for doc in &d {
        let kind = doc["kind"].as_str().unwrap();
        let ns = &doc["metadata"]["namespace"];
        match kind {
            "Namespace" => assert_eq!(doc["metadata"]["name"], "gl"),
            "ClusterRole" | "ClusterRoleBinding" => assert!(ns.is_null()),
            "WasmPlugin" => assert_eq!(ns, "istio-system"),
            _ => assert_eq!(ns, "gl", "{kind}"),
        }
    }
    let dep = one(&d, "Deployment");
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let port_names: Vec<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in one(&d, "Service")["spec"]["ports"].as_array().unwrap() {
        assert!(port_names.contains(&p["targetPort"].as_str().unwrap()));
    }
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        dep["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"],
        "false"
    );
    // Volumes name the documents that exist.
    let vols = pod["volumes"].as_array().unwrap();
    let vol = |n: &str| vols.iter().find(|v| v["name"] == n).unwrap();
    assert_eq!(
        vol("config")["configMap"]["name"],
        one(&d, "ConfigMap")["metadata"]["name"]
    );
    assert_eq!(
        vol("tokens")["secret"]["secretName"],
        one(&d, "Secret")["metadata"]["name"]
    );
    assert_eq!(
        vol("data")["persistentVolumeClaim"]["claimName"],
        one(&d, "PersistentVolumeClaim")["metadata"]["name"]
    );
    // Selectors select the pod.
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for sel in [
        &one(&d, "Service")["spec"]["selector"],
        &one(&d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        &one(&d, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        &dep["spec"]["selector"]["matchLabels"],
    ] {
        for (k, v) in sel.as_object().unwrap() {
            assert_eq!(&labels[k], v, "{k}");
        }
    }
    // The WasmPlugin fetches the module the control plane serves, and the filter's feed goes
    // through the sidecar's outbound cluster for the Service, named as Istio names it.
    let wp = &one(&d, "WasmPlugin")["spec"];
    assert_eq!(
        wp["url"],
        format!(
            "http://graylane.gl.svc.cluster.local:{API_PORT}{}",
            graylane_control_plane::plugin::WASM_PATH
        )
        .as_str()
    );
    assert_eq!(
        wp["pluginConfig"]["control_plane"]["cluster"],
        format!("outbound|{API_PORT}||graylane.gl.svc.cluster.local").as_str()
    );
    assert_eq!(wp["pluginConfig"]["services"], serde_json::json!(["b"]));
    assert_eq!(wp["match"][0]["mode"], "CLIENT");
    assert_eq!(
        wp["selector"]["matchLabels"]["graylane.io/filter"],
        "enabled"
    );
    assert!(wp.get("sha256").is_none());
}

#[test]
fn the_plugin_options() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("f.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0xyz").unwrap();
    let want: String = Sha256::digest(b"\0asm\x01\0\0\0xyz")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let d = docs(&install(&[
        "--only",
        "plugin",
        "--service",
        "b",
        "--service",
        "c.d",
        "--plugin-wasm",
        wasm.to_str().unwrap(),
        "--plugin-port",
        "8080",
        "--plugin-port",
        "9090",
        "--plugin-selector",
        "app=a",
        "--plugin-selector",
        "tier=web",
        "--fail-strategy",
        "fail-close",
        "--phase",
        "stats",
    ]));
    let wps = find(&d, "WasmPlugin");
    assert_eq!(wps.len(), 1, "one filter for both services");
    let s = &wps[0]["spec"];
    assert_eq!(
        s["pluginConfig"]["services"],
        serde_json::json!(["b", "c.d"])
    );
    assert_eq!(s["sha256"], want.as_str());
    assert_eq!(
        s["match"][0]["ports"],
        serde_json::json!([{"number": 8080}, {"number": 9090}])
    );
    assert_eq!(
        s["selector"]["matchLabels"],
        serde_json::json!({"app": "a", "tier": "web"})
    );
    assert_eq!(s["failStrategy"], "FAIL_CLOSE");
    assert_eq!(s["phase"], "STATS");
    let digest = "ab".repeat(32);
    let d = docs(&install(&[
        "--only",
        "plugin",
        "--service",
        "b",
        "--plugin-url",
        "oci://registry.example/graylane-filter:0.1.0",
        "--plugin-sha256",
        &digest,
    ]));
    let s = &one(&d, "WasmPlugin")["spec"];
    assert_eq!(s["url"], "oci://registry.example/graylane-filter:0.1.0");
    assert_eq!(s["sha256"], digest.as_str());
    assert_eq!(s["imagePullPolicy"], "IfNotPresent");
}

#[test]
fn bad_options_are_refused_naming_the_flag() {
    let services = dir_with_tokens();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--namespace", "Graylane"], "--namespace"),
        (vec!["--plugin-namespace=-x"], "--plugin-namespace"),
        (vec!["--storage", "lots"], "--storage"),
        (
            vec!["--image-pull-policy", "Sometimes"],
            "--image-pull-policy",
        ),
        (vec!["--write-token", "short"], "--write-token"),
        (
            vec!["--read-token", "has spaces in it, 1234"],
            "--read-token",
        ),
        (
            vec!["--service", "b", "--plugin-sha256", "abc"],
            "--plugin-sha256",
        ),
        (
            vec!["--service", "b", "--plugin-url", "ftp://x/y"],
            "--plugin-url",
        ),
        (
            vec!["--service", "b", "--plugin-selector", "novalue"],
            "--plugin-selector",
        ),
        (
            vec!["--service", "b", "--plugin-port", "0"],
            "--plugin-port",
        ),
        (vec!["--service", "b c"], "--service"),
        (
            vec!["--service", "b", "--plugin-host", "shop.example.com=a"],
            "--plugin-host",
        ),
        (vec!["--plugin-host", "shop.example.com"], "--plugin-host"),
        (vec!["--plugin-host", "shop:80=a"], "--plugin-host"),
        (
            vec!["--services", services.1.to_str().unwrap()],
            "belong in the Secret",
        ),
    ];
    for (args, want) in cases {
        let e = install_with(&args, &mut counter()).unwrap_err();
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

fn dir_with_tokens() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("graylane.yaml");
    std::fs::write(
        &p,
        "tokens: [{name: x, token: abcdefghijkl, role: write}]\nservices:\n  b:\n    route-strategy: {B: {status: G, id: {all: true}}}\n",
    )
    .unwrap();
    (dir, p)
}

#[test]
fn the_filter_accepts_every_plugin_configuration_install_writes() {
    let feed = ["--feed-token", "feed-token-0123456789"];
    for extra in [&[][..], &feed[..]] {
        let mut args = vec!["--only", "plugin", "--service", "b", "--service", "a.b_c"];
        args.extend_from_slice(&["--plugin-host", "Shop.example.com=b"]);
        args.extend_from_slice(extra);
        let d = docs(&install(&args));
        for wp in find(&d, "WasmPlugin") {
            let json = serde_json::to_vec(&wp["spec"]["pluginConfig"]).unwrap();
            let parsed = graylane_filter::PluginConfig::parse(&json);
            assert!(
                parsed.is_ok(),
                "{}: {:?}",
                wp["metadata"]["name"],
                parsed.err()
            );
        }
    }
    // The default: every service (a host mapped to one of them is accepted as it is).
    let d = docs(&install(&[
        "--only",
        "plugin",
        "--plugin-host",
        "shop.example.com=a",
    ]));
    let json = serde_json::to_vec(&one(&d, "WasmPlugin")["spec"]["pluginConfig"]).unwrap();
    let parsed = graylane_filter::PluginConfig::parse(&json).unwrap();
    assert_eq!(parsed.serves(), graylane_filter::Serves::All);
    assert_eq!(parsed.hosts["shop.example.com"], "a");
    // And the check can fail: a field the filter does not know is refused.
    assert!(graylane_filter::PluginConfig::parse(
        br#"{"service": "b", "control_plane": {"cluster": "c"}, "nope": 1}"#
    )
    .is_err());
}
