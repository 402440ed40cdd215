//! The OCI layout: what the manifest names, digests against blob contents, byte-identical
//! rebuilds, and layouts Istio would reject being rejected here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use graylane_oci::{build, read, Digest, Image, Options, MEDIA_CONFIG, MEDIA_LAYER};

/// A small valid module header plus a custom section, so content and size are not trivial.
fn module(tag: u8) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 ^ tag).collect();
    m.push(0); // custom section
    m.extend_from_slice(&[0x8c, 0x27]); // LEB128 5004 = name length + name + payload
    m.push(3);
    m.extend_from_slice(b"gl!");
    m.extend_from_slice(&payload);
    m
}

fn opts() -> Options {
    Options {
        tag: "0.1.0".into(),
        version: "0.1.0".into(),
        mtime: 0,
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn written(image: &Image) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("graylane-filter");
    image.write(&dir).unwrap();
    (tmp, dir)
}

#[test]
fn the_manifest_names_one_plugin_wasm_layer_of_the_compat_media_type() {
    let wasm = module(1);
    let image = build(&wasm, &opts()).unwrap();
    let (_t, dir) = written(&image);
    let names: Vec<String> = files(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, {
        let mut v = vec![
            "index.json".to_string(),
            "oci-layout".to_string(),
            format!("blobs/sha256/{}", image.manifest.descriptor.digest.hex()),
            format!("blobs/sha256/{}", image.config.descriptor.digest.hex()),
            format!("blobs/sha256/{}", image.layer.descriptor.digest.hex()),
        ];
        v.sort();
        v
    });
    let m: serde_json::Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["config"]["mediaType"], MEDIA_CONFIG);
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        m["layers"][0]["annotations"]["org.opencontainers.image.title"],
        "plugin.wasm"
    );
    assert_eq!(m["annotations"]["module.wasm.image/variant"], "compat");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );
    assert_eq!(
        index["manifests"][0]["digest"],
        image.digest().to_string().as_str()
    );
    // Read back as Istio would: plugin.wasm is the module, byte for byte.
    let pulled = read(&dir, Some("0.1.0")).unwrap();
    assert_eq!(pulled.wasm, wasm);
    assert_eq!(pulled.manifest_digest, image.digest());
    assert_eq!(image.wasm_sha256, Digest::of(&wasm));
}

#[test]
fn every_descriptor_digest_and_size_match_the_blob_it_names() {
    let image = build(&module(2), &opts()).unwrap();
    let (_t, dir) = written(&image);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest_desc = &index["manifests"][0];
    let blob = |d: &serde_json::Value| {
        let digest = d["digest"].as_str().unwrap();
        let bytes = std::fs::read(
            dir.join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap();
        assert_eq!(Digest::of(&bytes).to_string(), digest);
        assert_eq!(bytes.len() as u64, d["size"].as_u64().unwrap());
        bytes
    };
    let m: serde_json::Value = serde_json::from_slice(&blob(manifest_desc)).unwrap();
    blob(&m["config"]);
    blob(&m["layers"][0]);
}

#[test]
fn two_builds_write_the_same_bytes_and_the_same_digest() {
    let wasm = module(3);
    let a = build(&wasm, &opts()).unwrap();
    let b = build(&wasm, &opts()).unwrap();
    let (_ta, da) = written(&a);
    let (_tb, db) = written(&b);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(files(&da), files(&db));
    // Writing over an existing layout leaves no stale blob behind.
    let other = build(&module(4), &opts()).unwrap();
    other.write(&da).unwrap();
    assert_eq!(files(&da).len(), 5);
    assert_eq!(read(&da, None).unwrap().manifest_digest, other.digest());
    assert_ne!(other.digest(), a.digest());
    // The tar format is pinned (its digest does not depend on the gzip library): ustar,
    // one entry, mode 0644, owner 0:0, mtime 0.
    let cfg: serde_json::Value = serde_json::from_slice(&a.config.bytes).unwrap();
    assert_eq!(
        cfg,
        serde_json::json!({"architecture": "wasm", "os": "wasip1", "rootfs": {"type": "layers",
            "diff_ids": [cfg["rootfs"]["diff_ids"][0].clone()]}})
    );
    assert_eq!(
        cfg["rootfs"]["diff_ids"][0],
        "sha256:7b6dd9afbb76aa22f728e6c3289f9dadd91bbea0127e916587a8a4ef1ee96998"
    );
}

#[test]
fn the_mtime_is_the_only_input_besides_the_module_and_tag() {
    let wasm = module(5);
    let at = |mtime| build(&wasm, &Options { mtime, ..opts() }).unwrap().digest();
    assert_eq!(at(1_700_000_000), at(1_700_000_000));
    assert_ne!(at(0), at(1_700_000_000));
}

#[test]
fn not_a_module_and_bad_tags_are_refused() {
    assert!(matches!(
        build(b"hello world", &opts()),
        Err(graylane_oci::Error::NotWasm(_))
    ));
    for tag in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
        let e = build(
            &module(6),
            &Options {
                tag: tag.to_string(),
                ..opts()
            },
        )
        .unwrap_err();
        assert!(matches!(e, graylane_oci::Error::Tag(_)), "{tag:?}: {e}");
    }
}

/// Rewrites the manifest (and the index's descriptor of it) with `edit`.
fn with_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let old = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let old_path = dir
        .join("blobs/sha256")
        .join(old.strip_prefix("sha256:").unwrap());
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&old_path).unwrap()).unwrap();
    edit(&mut m);
    let bytes = serde_json::to_vec(&m).unwrap();
    let d = Digest::of(&bytes);
    std::fs::remove_file(&old_path).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), &bytes).unwrap();
    index["manifests"][0]["digest"] = d.to_string().into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn broken_layouts_are_rejected_with_what_is_wrong() {
    let image = build(&module(7), &opts()).unwrap();
    let err = |setup: &dyn Fn(&Path)| {
        let (_t, dir) = written(&image);
        setup(&dir);
        read(&dir, Some("0.1.0")).unwrap_err().to_string()
    };
    // A blob whose content no longer matches its name.
    let e = err(&|d| {
        let p = d
            .join("blobs/sha256")
            .join(image.layer.descriptor.digest.hex());
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(p, b).unwrap();
    });
    assert!(e.contains("layer: blob"), "{e}");
    // The single custom-typed layer Istio rejects.
    let e = err(&|d| {
        with_manifest(d, |m| {
            m["layers"][0]["mediaType"] = "application/vnd.module.wasm.content.layer.v1+wasm".into()
        })
    });
    assert!(e.contains("layers[0].mediaType"), "{e}");
    // Without the compat annotation.
    let e = err(&|d| with_manifest(d, |m| m["annotations"] = serde_json::json!({})));
    assert!(e.contains("module.wasm.image/variant"), "{e}");
    // A stale blob left in the layout.
    let e = err(&|d| std::fs::write(d.join("blobs/sha256").join("0".repeat(64)), b"x").unwrap());
    assert!(e.contains("no descriptor names it"), "{e}");
    // An unknown tag.
    let (_t, dir) = written(&image);
    let e = read(&dir, Some("9.9.9")).unwrap_err().to_string();
    assert!(e.contains("no manifest tagged"), "{e}");
    assert_eq!(MEDIA_LAYER, "application/vnd.oci.image.layer.v1.tar+gzip");
}
