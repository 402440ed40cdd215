//! The filter as an OCI image layout in Istio's Wasm image format, built without a container
//! runtime, byte for byte the same from the same `.wasm`.
//!
//! Format: the *compat* variant of the Wasm image spec, which Istio's image fetcher
//! (`pkg/wasm/imagefetcher.go`) tries first for an OCI manifest: one layer of media type
//! `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`, a standard image
//! config, and the manifest annotation `module.wasm.image/variant: compat`. Any registry and
//! any OCI tool (`oras`, `crane`, `skopeo`) takes it as an ordinary image. (Istio's other
//! accepted forms: a Docker schema-2 manifest whose last layer is a Docker tar+gzip layer, and
//! the *oci* artifact variant, which Istio only accepts with exactly two layers, one of them
//! `application/vnd.module.wasm.content.layer.v1+wasm`; a single custom-typed layer is
//! rejected by both of its parsers.)
//!
//! ```text
//!  DIR/oci-layout                {"imageLayoutVersion":"1.0.0"}
//!  DIR/index.json                one manifest, annotated org.opencontainers.image.ref.name=<tag>
//!  DIR/blobs/sha256/<manifest>   config + one layer, annotation module.wasm.image/variant=compat
//!  DIR/blobs/sha256/<config>     {"architecture":"wasm","os":"wasip1","rootfs":{diff_ids}}
//!  DIR/blobs/sha256/<layer>      gzip(tar(plugin.wasm)): mtime, owner and mode fixed
//! ```

pub mod trim;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The only layer type Istio's compat parser accepts in an OCI manifest.
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file Istio looks for in the layer (by base name).
pub const PLUGIN_FILE: &str = "plugin.wasm";
pub const VARIANT_KEY: &str = "module.wasm.image/variant";
pub const VARIANT: &str = "compat";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What can go wrong building, writing or reading a layout; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not a WebAssembly module (no \\0asm header)")]
    NotWasm(String),
    #[error("tag {0:?}: use letters, digits, '_', '.' or '-' (at most 128, not starting with '.' or '-')")]
    Tag(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }
    /// Lowercase hex, as Istio's `sha256:` field and `blobs/sha256/` names want it.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// Parses `sha256:<64 hex>`.
    pub fn parse(s: &str) -> Option<Digest> {
        let hex = s.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad digest {s:?}")))
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest (the fields graylane writes and Istio reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<Digest>,
}

/// The image config: platform and the layer's uncompressed digest (`diff_ids`), which
/// registries and `skopeo` check; no timestamps, so it never changes between builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageConfig {
    architecture: String,
    os: String,
    rootfs: RootFs,
}

/// How to build the image.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tag recorded in `index.json` (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// Recorded as `org.opencontainers.image.version`.
    pub version: String,
    /// The modification time written in the tar header (seconds; `SOURCE_DATE_EPOCH`).
    pub mtime: u64,
}

/// One stored blob.
#[derive(Debug, Clone)]
pub struct Blob {
    pub descriptor: Descriptor,
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>, annotations: BTreeMap<String, String>) -> Blob {
        Blob {
            descriptor: Descriptor {
                media_type: media_type.into(),
                digest: Digest::of(&bytes),
                size: bytes.len() as u64,
                annotations,
            },
            bytes,
        }
    }
}

/// A built image, in memory.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layer: Blob,
    pub index: Vec<u8>,
    /// sha256 of `plugin.wasm` itself (what a WasmPlugin with an `http://` URL checks).
    pub wasm_sha256: Digest,
}

fn valid_tag(t: &str) -> bool {
    // The OCI distribution spec's tag grammar: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_wasm(b: &[u8]) -> bool {
    b.len() >= 8 && b[..4] == *b"\0asm"
}

fn json<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|source| Error::Json {
        what: what.into(),
        source,
    })
}

/// `tar` with one entry, `plugin.wasm`: ustar header, mode 0644, owner 0:0, no user names,
/// the given mtime.
fn tar_of(wasm: &[u8], mtime: u64) -> Result<Vec<u8>, Error> {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(PLUGIN_FILE)
        .map_err(io(Path::new(PLUGIN_FILE)))?;
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header, wasm)
        .map_err(io(Path::new(PLUGIN_FILE)))?;
    b.into_inner().map_err(io(Path::new(PLUGIN_FILE)))
}

/// gzip with no file name and mtime 0 in its header.
fn gzip(data: &[u8]) -> Result<Vec<u8>, Error> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data).map_err(io(Path::new("layer")))?;
    gz.finish().map_err(io(Path::new("layer")))
}

/// Builds the image for `wasm`. Pure: the same input gives the same bytes.
pub fn build(wasm: &[u8], opts: &Options) -> Result<Image, Error> {
    if !is_wasm(wasm) {
        return Err(Error::NotWasm(PLUGIN_FILE.into()));
    }
    if !valid_tag(&opts.tag) {
        return Err(Error::Tag(opts.tag.clone()));
    }
    let tar = tar_of(wasm, opts.mtime)?;
    let layer = Blob::new(
        MEDIA_LAYER,
        gzip(&tar)?,
        BTreeMap::from([(
            "org.opencontainers.image.title".to_string(),
            PLUGIN_FILE.to_string(),
        )]),
    );
    let config = ImageConfig {
        architecture: "wasm".into(),
        os: "wasip1".into(),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![Digest::of(&tar)],
        },
    };
    let config = Blob::new(MEDIA_CONFIG, json("config", &config)?, BTreeMap::new());
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.into()),
        config: config.descriptor.clone(),
        layers: vec![layer.descriptor.clone()],
        annotations: BTreeMap::from([
            (VARIANT_KEY.to_string(), VARIANT.to_string()),
            (
                "org.opencontainers.image.title".to_string(),
                "graylane-filter".to_string(),
            ),
            (
                "org.opencontainers.image.version".to_string(),
                opts.version.clone(),
            ),
        ]),
    };
    let manifest = Blob::new(
        MEDIA_MANIFEST,
        json("manifest", &manifest)?,
        BTreeMap::from([(REF_NAME.to_string(), opts.tag.clone())]),
    );
    let index = Index {
        schema_version: 2,
        media_type: Some(MEDIA_INDEX.into()),
        manifests: vec![manifest.descriptor.clone()],
    };
    Ok(Image {
        index: json("index.json", &index)?,
        manifest,
        config,
        layer,
        wasm_sha256: Digest::of(wasm),
    })
}

impl Image {
    /// The manifest digest: what `oci://...@sha256:` and a WasmPlugin's `sha256` (with an
    /// `oci://` URL) name.
    pub fn digest(&self) -> Digest {
        self.manifest.descriptor.digest
    }

    /// Writes the layout to `dir`, replacing whatever was there (so no stale blob stays).
    /// The new layout is written beside it and renamed into place.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let name = dir
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", dir.display())))?;
        let tmp = dir.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        let blobs = tmp.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let put = |path: PathBuf, bytes: &[u8]| std::fs::write(&path, bytes).map_err(io(&path));
        put(tmp.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        put(tmp.join("index.json"), &self.index)?;
        for b in [&self.manifest, &self.config, &self.layer] {
            put(blobs.join(b.descriptor.digest.hex()), &b.bytes)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io(dir))
    }
}

/// What [`read`] found in a layout.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest_digest: Digest,
    pub manifest: Manifest,
    pub wasm: Vec<u8>,
}

fn read_blob(dir: &Path, d: &Descriptor, what: &str) -> Result<Vec<u8>, Error> {
    let path = dir.join("blobs").join("sha256").join(d.digest.hex());
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    if Digest::of(&bytes) != d.digest {
        return Err(Error::Invalid(format!(
            "{what}: blob {} has digest {}",
            path.display(),
            Digest::of(&bytes)
        )));
    }
    if bytes.len() as u64 != d.size {
        return Err(Error::Invalid(format!(
            "{what}: size {} in the descriptor, {} in the blob",
            d.size,
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        what: what.into(),
        source,
    })
}

/// Reads and checks a layout the way Istio's image fetcher would read the image from a
/// registry: the manifest tagged `tag` (or the only one), its digests and sizes, the compat
/// variant's media types, the config's `diff_ids`, and `plugin.wasm` in the last layer (by
/// base name, as Istio looks it up) starting with the Wasm magic. A blob that no descriptor
/// names is an error too (a stale layout).
pub fn read(dir: &Path, tag: Option<&str>) -> Result<Pulled, Error> {
    let layout_path = dir.join("oci-layout");
    let layout: serde_json::Value = parse(
        "oci-layout",
        &std::fs::read(&layout_path).map_err(io(&layout_path))?,
    )?;
    if layout["imageLayoutVersion"] != "1.0.0" {
        return Err(Error::Invalid(
            "oci-layout: imageLayoutVersion is not 1.0.0".into(),
        ));
    }
    let index_path = dir.join("index.json");
    let index: Index = parse(
        "index.json",
        &std::fs::read(&index_path).map_err(io(&index_path))?,
    )?;
    let desc = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .ok_or_else(|| Error::Invalid(format!("index.json: no manifest tagged {t:?}")))?,
        None => match index.manifests.as_slice() {
            [one] => one,
            _ => {
                return Err(Error::Invalid(format!(
                    "index.json: {} manifests; name a tag",
                    index.manifests.len()
                )))
            }
        },
    };
    if desc.media_type != MEDIA_MANIFEST {
        return Err(Error::Invalid(format!(
            "index.json: manifests[].mediaType is {:?}, not {MEDIA_MANIFEST}",
            desc.media_type
        )));
    }
    let manifest: Manifest = parse("manifest", &read_blob(dir, desc, "manifest")?)?;
    if manifest.schema_version != 2 {
        return Err(Error::Invalid("manifest: schemaVersion is not 2".into()));
    }
    if manifest.media_type.as_deref() != Some(MEDIA_MANIFEST) {
        return Err(Error::Invalid(format!(
            "manifest: mediaType {:?}, not {MEDIA_MANIFEST}",
            manifest.media_type
        )));
    }
    if manifest.annotations.get(VARIANT_KEY).map(String::as_str) != Some(VARIANT) {
        return Err(Error::Invalid(format!(
            "manifest: annotation {VARIANT_KEY}={VARIANT} missing"
        )));
    }
    if manifest.config.media_type != MEDIA_CONFIG {
        return Err(Error::Invalid(format!(
            "manifest: config.mediaType {:?}, not {MEDIA_CONFIG}",
            manifest.config.media_type
        )));
    }
    let [layer] = manifest.layers.as_slice() else {
        return Err(Error::Invalid(format!(
            "manifest: {} layers, the compat variant has one",
            manifest.layers.len()
        )));
    };
    if layer.media_type != MEDIA_LAYER {
        return Err(Error::Invalid(format!(
            "manifest: layers[0].mediaType {:?}, not {MEDIA_LAYER} (Istio rejects it)",
            layer.media_type
        )));
    }
    let config: ImageConfig = parse("config", &read_blob(dir, &manifest.config, "config")?)?;
    let gz = read_blob(dir, layer, "layer")?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut tar)
        .map_err(io(Path::new("layer (gzip)")))?;
    if config.rootfs.diff_ids != [Digest::of(&tar)] {
        return Err(Error::Invalid(
            "config: rootfs.diff_ids does not name the layer's uncompressed digest".into(),
        ));
    }
    let mut wasm = None;
    let mut archive = tar::Archive::new(tar.as_slice());
    for entry in archive.entries().map_err(io(Path::new("layer (tar)")))? {
        let mut entry = entry.map_err(io(Path::new("layer (tar)")))?;
        let path = entry.path().map_err(io(Path::new("layer (tar)")))?;
        if path.file_name().and_then(|n| n.to_str()) == Some(PLUGIN_FILE) {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(io(Path::new(PLUGIN_FILE)))?;
            wasm = Some(bytes);
            break;
        }
    }
    let wasm = wasm.ok_or_else(|| Error::Invalid(format!("layer: no {PLUGIN_FILE}")))?;
    if !is_wasm(&wasm) {
        return Err(Error::NotWasm(format!("layer: {PLUGIN_FILE}")));
    }
    let named: Vec<String> = [desc, &manifest.config, layer]
        .iter()
        .map(|d| d.digest.hex())
        .collect();
    let blobs = dir.join("blobs").join("sha256");
    for f in std::fs::read_dir(&blobs).map_err(io(&blobs))? {
        let f = f.map_err(io(&blobs))?;
        let name = f.file_name().to_string_lossy().into_owned();
        if !named.contains(&name) {
            return Err(Error::Invalid(format!(
                "blobs/sha256/{name}: no descriptor names it (a stale layout?)"
            )));
        }
    }
    Ok(Pulled {
        manifest_digest: desc.digest,
        manifest,
        wasm,
    })
}
