//! Pulling from a registry (OCI distribution API v2): manifest (following an index or
//! manifest list to the requested platform, linux/amd64 by default), config and layer
//! blobs, each hashed as it streams into the content-addressed blob cache and refused on a
//! mismatch. Several blobs download at once. The result is written as an OCI image layout
//! in the cache, which the rest of the bake reads like any local layout; a record per
//! reference lets `--pull missing|never` resolve a tag without the network.
//! Anonymous Bearer tokens from `WWW-Authenticate` and docker-config credentials are
//! handled; HTTP is used for localhost / 127.0.0.0/8 and `--insecure-registry` registries,
//! HTTPS elsewhere. HTTP is done with `ureq` (blocking, no async runtime); proxies come
//! from `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` (see `proxy.rs`).

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::cache::{AtomicFile, Cache};
use crate::digest::Digest;
use crate::progress::{BlobProgress, PullProgress};
use crate::pull_options::{Platform, PullOptions, PullPolicy};
use crate::reference::RegistryRef;
use crate::BakeError;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: u64 = 4 << 20;
/// Attempts per request (connection failures and 5xx).
const RETRIES: u32 = 4;

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

/// How requests are authenticated, learned from the registry's 401 answers.
#[derive(Default)]
struct Auth {
    token: Option<String>,
    /// The registry asked for Basic auth: send the credentials on every request.
    basic: bool,
}

/// A client for one registry; shared by the threads that download blobs.
pub struct RegistryClient {
    /// One HTTP agent (connection pool) per proxy in use, made on first use; see
    /// `proxy::for_url`.
    agents: Mutex<Vec<(Option<String>, ureq::Agent)>>,
    base: String,
    registry: String,
    auth: Mutex<Auth>,
    /// From docker's config file, if it names this registry.
    creds: Option<(String, String)>,
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
        Ok(Self {
            agents: Mutex::new(Vec::new()),
            base: format!("{scheme}://{host}"),
            registry: registry.to_string(),
            auth: Mutex::new(Auth::default()),
            creds: crate::credentials::lookup(registry),
        })
    }

    /// A GET request for `url` on the agent for the proxy that `url` goes through.
    fn request(&self, url: &str) -> ureq::Request {
        let proxy = crate::proxy::for_url(url);
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let agent = match agents.iter().find(|(p, _)| *p == proxy) {
            Some((_, a)) => a.clone(),
            None => {
                let mut b = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(15))
                    .timeout(Duration::from_secs(600))
                    .redirects(10)
                    // Authorization survives a redirect only to the same host.
                    .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
                    .try_proxy_from_env(false);
                // An unusable proxy setting means a direct connection.
                if let Some(p) = proxy.as_deref().and_then(|p| ureq::Proxy::new(p).ok()) {
                    b = b.proxy(p);
                }
                let a = b.build();
                agents.push((proxy, a.clone()));
                a
            }
        };
        agent.get(url)
    }

    /// GET with the current token; on 401 obtains a token (or switches to Basic) once and
    /// retries. Connection failures and 5xx answers are retried with backoff; 4xx are final.
    fn get(&self, url: &str, accept: Option<&str>, from: u64) -> Result<ureq::Response, BakeError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        let mut authed = false;
        loop {
            attempt += 1;
            let mut req = self.request(url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if from > 0 {
                req = req.set("Range", &format!("bytes={from}-"));
            }
            {
                let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = &auth.token {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                } else if let (true, Some((u, p))) = (auth.basic, &self.creds) {
                    req = req.set("Authorization", &basic_auth(u, p));
                }
            }
            let resp = match send(req) {
                Ok(r) => r,
                Err(e) if attempt < RETRIES => {
                    tracing::debug!(%url, error = %e, "retrying");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    continue;
                }
                // ureq names the URL in most transport errors; make sure it is there.
                Err(e) if e.url().is_some() => return Err(net_err(&self.registry, e)),
                Err(e) => return Err(net_err(&self.registry, format!("GET {url}: {e}"))),
            };
            let status = resp.status();
            if status == 401 {
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
                    .header("www-authenticate")
                    .and_then(parse_www_authenticate)
                    .ok_or_else(|| {
                        net_err(
                            &self.registry,
                            "401 Unauthorized without a usable WWW-Authenticate challenge",
                        )
                    })?;
                if challenge.scheme == "basic" {
                    self.auth.lock().unwrap_or_else(|p| p.into_inner()).basic = true;
                } else {
                    let token = self.fetch_token(&challenge)?;
                    self.auth.lock().unwrap_or_else(|p| p.into_inner()).token = Some(token);
                }
                continue;
            }
            if (500..600).contains(&status) && attempt < RETRIES {
                std::thread::sleep(backoff);
                backoff *= 2;
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(net_err(
                    &self.registry,
                    format!("GET {url}: HTTP {}", status_line(&resp)),
                ));
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
        let mut req = self.request(&c.realm);
        if let Some(s) = &c.service {
            req = req.query("service", s);
        }
        if let Some(s) = &c.scope {
            req = req.query("scope", s);
        }
        if let Some((u, p)) = &self.creds {
            req = req.set("Authorization", &basic_auth(u, p));
        }
        let resp = send(req).map_err(|e| net_err(&self.registry, e))?;
        if !(200..300).contains(&resp.status()) {
            return Err(net_err(
                &self.registry,
                format!("token endpoint {}: HTTP {}", c.realm, status_line(&resp)),
            ));
        }
        let v: serde_json::Value = resp.into_json().map_err(|e| net_err(&self.registry, e))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| net_err(&self.registry, "the token endpoint returned no token"))
    }

    /// Fetches a manifest (or index); returns (content type, bytes, digest). The digest is
    /// checked against the one asked for, or the one the registry announced.
    fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>, Digest), BakeError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self.get(&url, Some(ACCEPT), 0)?;
        let header = |name: &str| resp.header(name).unwrap_or("").to_string();
        let ctype = header("content-type")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let announced = header("docker-content-digest");
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| net_err(&self.registry, e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(net_err(
                &self.registry,
                format!("manifest {reference} is larger than {MAX_MANIFEST} bytes"),
            ));
        }
        let digest = Digest::of_bytes(&bytes);
        let expected = if reference.starts_with("sha256:") {
            reference
        } else {
            announced.as_str()
        };
        if expected.starts_with("sha256:") && digest.to_string() != expected {
            return Err(BakeError::Blob {
                path: PathBuf::from(&url),
                digest: expected.to_string(),
                reason: format!("manifest content hashes to {digest}"),
            });
        }
        Ok((ctype, bytes, digest))
    }

    /// Streams a blob into the cache, hashing it as it arrives; a mismatch in digest or
    /// size discards it. A cache hit downloads nothing. Bytes land in `<hex>.partial`
    /// first: an interrupted download (this run or a killed earlier one) resumes from there
    /// with a Range request.
    fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        cache: &Cache,
        progress: &PullProgress,
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
            let resumed = resp.status() == 206;
            let start = if resumed { have } else { 0 };
            let mut hasher = Sha256::new();
            if resumed {
                // The bytes already on disk start the hash; the rest is hashed in flight.
                let mut f = File::open(&partial)
                    .map_err(|e| BakeError::io(format!("reading {}", partial.display()), e))?;
                io::copy(&mut (&mut f).take(start), &mut HashSink(&mut hasher))
                    .map_err(|e| BakeError::io(format!("reading {}", partial.display()), e))?;
            }
            let mut file = fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(!resumed)
                .open(&partial)
                .map_err(|e| BakeError::io(format!("opening {}", partial.display()), e))?;
            file.set_len(start)
                .map_err(|e| BakeError::io(format!("truncating {}", partial.display()), e))?;
            io::Seek::seek(&mut file, io::SeekFrom::End(0))
                .map_err(|e| BakeError::io(format!("seeking in {}", partial.display()), e))?;
            let mut file = io::BufWriter::new(file);
            let bar = progress.blob(digest, size, start, &self.registry);
            let mut sink = Tee {
                file: &mut file,
                hasher: &mut hasher,
                bar: &bar,
                written: 0,
            };
            // One byte more than expected is read so an oversized blob is noticed.
            let copied = io::copy(&mut resp.into_reader().take(size - start + 1), &mut sink);
            let written = sink.written;
            let flushed = file.into_inner().map_err(|e| e.into_error());
            match (copied, flushed) {
                (Ok(_), Ok(f)) => f.sync_all().map_err(|e| BakeError::io("fsync", e))?,
                (Err(e), _) | (_, Err(e)) if attempt < RETRIES => {
                    bar.finish("interrupted");
                    tracing::debug!(%digest, error = %e, "download interrupted, resuming");
                    continue;
                }
                (Err(e), _) | (_, Err(e)) => {
                    bar.finish("failed");
                    return Err(net_err(
                        &self.registry,
                        format!("downloading {digest}: {e}"),
                    ));
                }
            }
            let n = start + written;
            let got = Digest::parse(&format!("sha256:{}", hex::encode(hasher.finalize())))
                .map_err(|e| net_err(&self.registry, e))?;
            if got != *digest || n != size {
                bar.finish("digest mismatch");
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
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            bar.finish("done");
            return Ok(dest);
        }
    }
}

/// Sends a request; an answer with any status is a response (ureq reports 4xx and 5xx
/// as errors), so only a failure to get an answer at all is an error.
fn send(req: ureq::Request) -> Result<ureq::Response, Box<ureq::Transport>> {
    match req.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(r),
        Err(ureq::Error::Transport(t)) => Err(Box::new(t)),
    }
}

/// `404 Not Found`: the status code and the reason the server gave.
fn status_line(resp: &ureq::Response) -> String {
    let text = resp.status_text().trim();
    if text.is_empty() {
        resp.status().to_string()
    } else {
        format!("{} {text}", resp.status())
    }
}

/// An `Authorization` header value for HTTP Basic auth.
fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Feeds bytes to a hasher (as an `io::Write`).
struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a download to its file, its hash and its progress bar at once.
struct Tee<'a, W: Write> {
    file: &'a mut W,
    hasher: &'a mut Sha256,
    bar: &'a BlobProgress,
    written: u64,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bar.advance(n as u64);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn is_index_type(t: &str) -> bool {
    t == "application/vnd.oci.image.index.v1+json"
        || t == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Where the manifest digest a reference last resolved to (for a platform) is recorded.
fn ref_record(cache: &Cache, r: &RegistryRef, platform: &Platform) -> PathBuf {
    let key = Digest::of_bytes(format!("{r}|{platform}").as_bytes());
    cache
        .root()
        .join("registry/refs")
        .join(format!("{}.json", key.hex()))
}

fn layout_dir(cache: &Cache, manifest: &Digest) -> PathBuf {
    cache.root().join("registry").join(manifest.hex())
}

/// The cached layout `r` resolved to on an earlier pull, if it is still complete.
fn cached_layout(cache: &Cache, r: &RegistryRef, platform: &Platform) -> Option<PathBuf> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(ref_record(cache, r, platform)).ok()?).ok()?;
    let digest = Digest::parse(v["manifest"].as_str()?).ok()?;
    let dir = layout_dir(cache, &digest);
    dir.join("index.json").is_file().then_some(dir)
}

/// The tag under which the pulled manifest appears in the layout written by
/// [`pull_to_layout`].
pub const LAYOUT_TAG: &str = "pulled";

/// Pulls `r` into the cache (honouring `opts.policy`) and returns an OCI layout directory
/// holding it under [`LAYOUT_TAG`].
pub fn pull_to_layout(
    r: &RegistryRef,
    cache: &Cache,
    opts: &PullOptions,
) -> Result<PathBuf, BakeError> {
    match opts.policy {
        PullPolicy::Always => {}
        PullPolicy::Missing => {
            if let Some(dir) = cached_layout(cache, r, &opts.platform) {
                return Ok(dir);
            }
        }
        PullPolicy::Never => {
            return cached_layout(cache, r, &opts.platform).ok_or_else(|| BakeError::NotCached {
                reference: r.to_string(),
            })
        }
    }
    let client = RegistryClient::new(&r.registry, opts.is_insecure(&r.registry))?;
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
        let entries = manifest["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let pick = entries
            .iter()
            .find(|m| opts.platform.matches(&m["platform"]))
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| {
                let available: Vec<String> = entries
                    .iter()
                    .map(|m| Platform::describe(&m["platform"]))
                    .collect();
                BakeError::Unsupported(format!(
                    "{r} has no {} image (it has: {})",
                    opts.platform,
                    available.join(", ")
                ))
            })?
            .to_string();
        (ctype, bytes, digest) = client.manifest(&r.repository, &pick)?;
        manifest = parse(&bytes)?;
    }
    if ctype.is_empty() || is_index_type(&ctype) {
        ctype = manifest
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
    }

    // The layout: index.json -> this manifest; blobs hard-linked from the blob cache.
    let layout = layout_dir(cache, &digest);
    if !layout.join("index.json").is_file() {
        let parent = cache.root().join("registry");
        cache.ensure_dir(&parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&parent)
            .map_err(|e| BakeError::io("creating a layout dir", e))?;
        let blobs = tmp.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| BakeError::io("creating blobs dir", e))?;
        let mut wanted = vec![manifest["config"].clone()];
        wanted.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
        let mut descs = Vec::with_capacity(wanted.len());
        for d in &wanted {
            let dg = d["digest"]
                .as_str()
                .ok_or_else(|| net_err(&r.registry, "descriptor without a digest"))?;
            let dg = Digest::parse(dg).map_err(|e| net_err(&r.registry, e))?;
            let size = d["size"]
                .as_u64()
                .ok_or_else(|| net_err(&r.registry, format!("descriptor {dg} has no size")))?;
            descs.push((dg, size));
        }
        let cached = download_all(&client, &r.repository, &descs, cache, opts)?;
        for (path, (dg, _)) in cached.iter().zip(&descs) {
            link_or_copy(path, &blobs.join(dg.hex()))?;
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
                "annotations": { "org.opencontainers.image.ref.name": LAYOUT_TAG }
            }]
        });
        fs::write(tmp.path().join("index.json"), index.to_string())
            .map_err(|e| BakeError::io("writing index.json", e))?;
        let tmp = tmp.keep();
        if fs::rename(&tmp, &layout).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
    }
    // Remember what the reference resolved to, for offline pulls.
    let record = ref_record(cache, r, &opts.platform);
    cache.ensure_dir(record.parent().unwrap_or(cache.root()))?;
    let mut f = AtomicFile::create(&record)?;
    f.file()
        .write_all(
            serde_json::json!({
                "reference": r.to_string(),
                "platform": opts.platform.to_string(),
                "manifest": digest.to_string(),
            })
            .to_string()
            .as_bytes(),
        )
        .map_err(|e| BakeError::io(format!("writing {}", record.display()), e))?;
    f.commit()?;
    Ok(layout)
}

/// Downloads `descs` with at most `opts.max_concurrent_downloads` at a time; returns the
/// cached paths in the same order, or the first error in that order.
fn download_all(
    client: &RegistryClient,
    repo: &str,
    descs: &[(Digest, u64)],
    cache: &Cache,
    opts: &PullOptions,
) -> Result<Vec<PathBuf>, BakeError> {
    let progress = PullProgress::for_stderr();
    let queue = Mutex::new((0..descs.len()).collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<Result<PathBuf, BakeError>>>> =
        Mutex::new((0..descs.len()).map(|_| None).collect());
    let workers = opts.max_concurrent_downloads.clamp(1, 16).min(descs.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some(i) = next else { break };
                let (dg, size) = &descs[i];
                let res = client.blob(repo, dg, *size, cache, &progress);
                let failed = res.is_err();
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(res);
                if failed {
                    // Stop taking new work; the blobs already in flight finish.
                    queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut paths = Vec::with_capacity(descs.len());
    let mut first_err = None;
    for r in results {
        match r {
            Some(Ok(p)) => paths.push(p),
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(paths),
    }
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
