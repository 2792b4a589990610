//! Pulling from a registry (OCI distribution API v2): manifest (following an index or
//! manifest list to linux/amd64), config and layer blobs, each verified against its digest
//! while it streams into the content-addressed blob cache. The result is written as an OCI
//! image layout in the cache, which the rest of the bake reads like any local layout.
//! Anonymous Bearer tokens from `WWW-Authenticate` are handled; HTTP is used for
//! localhost / 127.0.0.0/8 registries, HTTPS elsewhere.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cache::Cache;
use crate::digest::{Digest, HashingReader};
use crate::reference::RegistryRef;
use crate::BakeError;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: u64 = 4 << 20;
/// Attempts per request (connection failures and 5xx).
const RETRIES: u32 = 4;

/// A parsed `WWW-Authenticate: Bearer realm="..",service="..",scope=".."` challenge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Challenge {
    pub scheme: String,
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses one challenge; quoted values may contain commas.
pub fn parse_www_authenticate(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut c = Challenge {
        scheme: scheme.to_ascii_lowercase(),
        ..Default::default()
    };
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        match key.as_str() {
            "realm" => c.realm = value.to_string(),
            "service" => c.service = Some(value.to_string()),
            "scope" => c.scope = Some(value.to_string()),
            _ => {}
        }
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    Some(c)
}

fn is_local(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

pub struct RegistryClient {
    http: reqwest::blocking::Client,
    base: String,
    registry: String,
    token: Option<String>,
    /// From docker's config file, if it names this registry.
    creds: Option<(String, String)>,
    /// The registry asked for Basic auth: send the credentials on every request.
    basic: bool,
}

fn net_err(registry: &str, e: impl std::fmt::Display) -> BakeError {
    BakeError::Network {
        registry: registry.to_string(),
        reason: e.to_string(),
    }
}

impl RegistryClient {
    pub fn new(registry: &str, insecure: bool) -> Result<Self, BakeError> {
        let scheme = if insecure || is_local(registry) {
            "http"
        } else {
            "https"
        };
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| net_err(registry, e))?;
        Ok(Self {
            http,
            base: format!("{scheme}://{host}"),
            registry: registry.to_string(),
            token: None,
            creds: crate::credentials::lookup(registry),
            basic: false,
        })
    }

    /// GET with the current token; on 401 obtains an anonymous token once and retries.
    /// Connection failures and 5xx answers are retried with backoff; 4xx are final.
    fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        from: u64,
    ) -> Result<reqwest::blocking::Response, BakeError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        let mut authed = false;
        loop {
            attempt += 1;
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if from > 0 {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            } else if let (true, Some((u, p))) = (self.basic, &self.creds) {
                req = req.basic_auth(u, Some(p));
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) if attempt < RETRIES => {
                    tracing::debug!(%url, error = %e, "retrying");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    continue;
                }
                Err(e) => return Err(net_err(&self.registry, e)),
            };
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                if authed {
                    let why = if self.creds.is_some() {
                        "the credentials in the docker config were rejected"
                    } else {
                        "no credentials for it in $DOCKER_CONFIG/config.json or ~/.docker/config.json"
                    };
                    return Err(net_err(
                        &self.registry,
                        format!("GET {url}: HTTP 401 Unauthorized ({why})"),
                    ));
                }
                authed = true;
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_www_authenticate)
                    .ok_or_else(|| {
                        net_err(
                            &self.registry,
                            "401 Unauthorized without a usable WWW-Authenticate challenge",
                        )
                    })?;
                if challenge.scheme == "basic" {
                    self.basic = true;
                } else {
                    self.token = Some(self.fetch_token(&challenge)?);
                }
                continue;
            }
            if status.is_server_error() && attempt < RETRIES {
                std::thread::sleep(backoff);
                backoff *= 2;
                continue;
            }
            if !status.is_success() {
                return Err(net_err(&self.registry, format!("GET {url}: HTTP {status}")));
            }
            return Ok(resp);
        }
    }

    fn fetch_token(&self, c: &Challenge) -> Result<String, BakeError> {
        if c.scheme != "bearer" || c.realm.is_empty() {
            return Err(net_err(
                &self.registry,
                format!("unsupported auth challenge {:?}", c.scheme),
            ));
        }
        let mut req = self.http.get(&c.realm);
        let mut q = Vec::new();
        if let Some(s) = &c.service {
            q.push(("service", s.clone()));
        }
        if let Some(s) = &c.scope {
            q.push(("scope", s.clone()));
        }
        req = req.query(&q);
        let resp = req.send().map_err(|e| net_err(&self.registry, e))?;
        if !resp.status().is_success() {
            return Err(net_err(
                &self.registry,
                format!("token endpoint {}: HTTP {}", c.realm, resp.status()),
            ));
        }
        let v: serde_json::Value = resp.json().map_err(|e| net_err(&self.registry, e))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| net_err(&self.registry, "the token endpoint returned no token"))
    }

    /// Fetches a manifest (or index); returns (content type, bytes, digest).
    fn manifest(
        &mut self,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>, Digest), BakeError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self.get(&url, Some(ACCEPT), 0)?;
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let mut bytes = Vec::new();
        resp.take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| net_err(&self.registry, e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(net_err(
                &self.registry,
                format!("manifest {reference} is larger than {MAX_MANIFEST} bytes"),
            ));
        }
        let digest = Digest::of_bytes(&bytes);
        if reference.starts_with("sha256:") && digest.to_string() != reference {
            return Err(BakeError::Blob {
                path: PathBuf::from(&url),
                digest: reference.to_string(),
                reason: format!("manifest content hashes to {digest}"),
            });
        }
        Ok((ctype, bytes, digest))
    }

    /// Streams a blob into the cache, verifying size and digest; a cache hit downloads
    /// nothing. Bytes land in `<hex>.partial` first: an interrupted download (this run or a
    /// killed earlier one) resumes from there with a Range request.
    fn blob(
        &mut self,
        repo: &str,
        digest: &Digest,
        size: u64,
        cache: &Cache,
    ) -> Result<PathBuf, BakeError> {
        let dir = cache.root().join("blobs/sha256");
        cache.ensure_dir(&dir)?;
        let dest = dir.join(digest.hex());
        if dest.is_file() {
            return Ok(dest);
        }
        let partial = dir.join(format!("{}.partial", digest.hex()));
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let have = fs::metadata(&partial)
                .map(|m| m.len())
                .unwrap_or(0)
                .min(size);
            let resp = self.get(&url, None, have)?;
            let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(resumed)
                .write(true)
                .truncate(!resumed)
                .open(&partial)
                .map_err(|e| BakeError::io(format!("opening {}", partial.display()), e))?;
            if resumed {
                eprintln!("supermachine: resuming {digest} at {have} of {size} bytes");
            } else {
                eprintln!(
                    "supermachine: pulling {digest} ({:.1} MiB) from {}",
                    size as f64 / 1048576.0,
                    self.registry
                );
            }
            match io::copy(
                &mut resp.take(size.saturating_sub(if resumed { have } else { 0 }) + 1),
                &mut file,
            ) {
                Ok(_) => {}
                Err(e) if attempt < RETRIES => {
                    tracing::debug!(%digest, error = %e, "download interrupted, resuming");
                    continue;
                }
                Err(e) => {
                    return Err(net_err(
                        &self.registry,
                        format!("downloading {digest}: {e}"),
                    ))
                }
            }
            file.sync_all().map_err(|e| BakeError::io("fsync", e))?;
            drop(file);
            let f = File::open(&partial).map_err(|e| BakeError::io("reading a download", e))?;
            let (got, n) = HashingReader::new(io::BufReader::new(f))
                .finish()
                .map_err(|e| BakeError::io("hashing a download", e))?;
            if got != *digest || n != size {
                let _ = fs::remove_file(&partial);
                return Err(BakeError::Blob {
                    path: PathBuf::from(url),
                    digest: digest.to_string(),
                    reason: format!(
                        "downloaded {n} bytes hashing to {got} (expected {size} bytes)"
                    ),
                });
            }
            fs::rename(&partial, &dest)
                .map_err(|e| BakeError::io(format!("renaming into {}", dest.display()), e))?;
            return Ok(dest);
        }
    }
}

fn is_index_type(t: &str) -> bool {
    t == "application/vnd.oci.image.index.v1+json"
        || t == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Pulls `r` into the cache and returns an OCI layout directory holding it, tagged
/// `latest`-or-its-tag (see the return's second field).
pub fn pull_to_layout(
    r: &RegistryRef,
    cache: &Cache,
    insecure: bool,
) -> Result<(PathBuf, String), BakeError> {
    let mut client = RegistryClient::new(&r.registry, insecure)?;
    let reference = r
        .digest
        .clone()
        .or_else(|| r.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let parse = |bytes: &[u8]| -> Result<serde_json::Value, BakeError> {
        serde_json::from_slice(bytes)
            .map_err(|e| net_err(&r.registry, format!("manifest is not JSON: {e}")))
    };
    let (mut ctype, mut bytes, mut digest) = client.manifest(&r.repository, &reference)?;
    let mut manifest = parse(&bytes)?;
    // An index is recognized by its Content-Type, or by its `manifests` when the
    // registry sent none.
    if is_index_type(&ctype) || manifest.get("manifests").is_some() {
        let pick = manifest["manifests"]
            .as_array()
            .and_then(|ms| {
                ms.iter().find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                })
            })
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| net_err(&r.registry, format!("{r} has no linux/amd64 image")))?
            .to_string();
        (ctype, bytes, digest) = client.manifest(&r.repository, &pick)?;
        manifest = parse(&bytes)?;
    }
    if ctype.is_empty() {
        ctype = manifest
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
    }

    // The layout: index.json -> this manifest; blobs hard-linked from the blob cache.
    let layout = cache.root().join("registry").join(digest.hex());
    if !layout.join("index.json").is_file() {
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in({
                let p = cache.root().join("registry");
                cache.ensure_dir(&p)?;
                p
            })
            .map_err(|e| BakeError::io("creating a layout dir", e))?;
        let blobs = tmp.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| BakeError::io("creating blobs dir", e))?;
        let mut descs = vec![manifest["config"].clone()];
        descs.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
        for d in &descs {
            let dg = d["digest"]
                .as_str()
                .ok_or_else(|| net_err(&r.registry, "descriptor without a digest"))?;
            let dg = Digest::parse(dg).map_err(|e| net_err(&r.registry, e))?;
            let size = d["size"].as_u64().unwrap_or(0);
            let cached = client.blob(&r.repository, &dg, size, cache)?;
            link_or_copy(&cached, &blobs.join(dg.hex()))?;
        }
        File::create(blobs.join(digest.hex()))
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(|e| BakeError::io("writing the manifest", e))?;
        fs::write(
            tmp.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(|e| BakeError::io("writing oci-layout", e))?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": ctype,
                "digest": digest.to_string(),
                "size": bytes.len(),
                "annotations": { "org.opencontainers.image.ref.name": "pulled" }
            }]
        });
        fs::write(tmp.path().join("index.json"), index.to_string())
            .map_err(|e| BakeError::io("writing index.json", e))?;
        let tmp = tmp.keep();
        if fs::rename(&tmp, &layout).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
    }
    Ok((layout, "pulled".to_string()))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), BakeError> {
    fs::hard_link(from, to)
        .or_else(|_| fs::copy(from, to).map(|_| ()))
        .map_err(|e| BakeError::io(format!("placing {}", to.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn www_authenticate() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(c.scope.as_deref(), Some("repository:library/nginx:pull"));
        let c = parse_www_authenticate(r#"Bearer realm="https://ghcr.io/token", scope="repository:a/b:pull,push", service=ghcr.io"#).unwrap();
        assert_eq!(
            c.scope.as_deref(),
            Some("repository:a/b:pull,push"),
            "commas inside quotes"
        );
        assert_eq!(c.service.as_deref(), Some("ghcr.io"));
        let c = parse_www_authenticate(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(
            (c.scheme.as_str(), c.realm.as_str()),
            ("basic", "Registry Realm")
        );
        assert!(parse_www_authenticate(r#"Bearer realm="unterminated"#).is_none());
        assert_eq!(parse_www_authenticate("Bearer").unwrap().realm, "");
    }

    #[test]
    fn local_registries_use_http() {
        assert!(is_local("127.0.0.1:5000"));
        assert!(is_local("localhost:5000"));
        assert!(is_local("localhost"));
        assert!(!is_local("ghcr.io"));
        assert!(!is_local("10.0.0.1:5000"));
    }
}
