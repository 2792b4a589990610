//! Pulling from a real registry: Debian's docker-registry on 127.0.0.1 with its own
//! config (never the package's default, which listens on all interfaces), images pushed
//! with skopeo in OCI and Docker v2s2 form.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use supermachine::{Error, Image, PullPolicy, VmConfig};

struct Registry {
    child: Child,
    addr: String,
    data: PathBuf,
    /// The registry's access log (one line per request, Apache combined format).
    access_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// How many requests so far started with `request` (say `GET /v2/web/manifests/latest`).
    fn requests(&self, request: &str) -> usize {
        let needle = format!("\"{request} HTTP/");
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    start_registry_with("")
}

fn start_registry_with(extra_config: &str) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra_config}",
            data.display()
        ),
    )
    .unwrap();
    let access_log = dir.path().join("access.log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::fs::File::create(&access_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (apt-get install docker-registry)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        child,
        addr,
        data,
        access_log,
        _dir: dir,
    }
}

fn push(reg: &Registry, layout: &str, dest: &str, format: &str) {
    let st = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            "--format",
            format,
        ])
        .arg(format!("oci:{}:latest", images().join(layout).display()))
        .arg(format!("docker://{}/{dest}", reg.addr))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo push of {layout} as {format}");
}

/// The registry's file for its biggest blob (the layer) and that blob's digest hex.
fn largest_stored_blob(reg: &Registry) -> (PathBuf, String) {
    let path = files_under(&reg.data)
        .into_iter()
        .filter(|p| p.ends_with("data") && p.to_string_lossy().contains("/blobs/"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let hex = path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    (path, hex)
}

fn with_cache(cache: &Path) -> Command {
    let mut c = supermachine();
    c.env("SUPERMACHINE_CACHE", cache);
    c
}

#[test]
fn oci_and_docker_manifests_pull_and_run() {
    let reg = start_registry();
    push(&reg, "busybox", "busybox:oci", "oci");
    push(&reg, "busybox", "busybox:v2s2", "v2s2");
    let cache = tempfile::tempdir().unwrap();
    for tag in ["oci", "v2s2"] {
        let o = boot_with(
            with_cache(cache.path()),
            &[
                &format!("{}/busybox:{tag}", reg.addr),
                "--",
                "/bin/sh",
                "-c",
                "echo pulled-$0",
                tag,
            ],
        );
        assert_code(&o, 0);
        assert_eq!(stdout(&o), format!("pulled-{tag}\n"));
    }
    // The layer was shared between both shapes (same diff_id): one squashfs.
    assert_eq!(files_under(&cache.path().join("layers")).len(), 1);

    // A multi-arch image as an OCI index and as a Docker manifest list: amd64 is chosen.
    push(&reg, "multiarch", "multi:oci", "oci");
    push(&reg, "multiarch", "multi:list", "v2s2");
    for tag in ["oci", "list"] {
        let o = boot_with(
            with_cache(cache.path()),
            &[
                &format!("{}/multi:{tag}", reg.addr),
                "--",
                "/bin/sh",
                "-c",
                "echo $ARCH",
            ],
        );
        assert_code(&o, 0);
        assert_eq!(stdout(&o), "amd64\n", "{tag}");
    }
    // gzip, zstd and uncompressed layers through the registry (whiteouts included).
    push(&reg, "layered", "layered:latest", "oci");
    let o = boot_with(
        with_cache(cache.path()),
        &[
            "--entrypoint",
            "/bin/ls",
            &format!("{}/layered:latest", reg.addr),
            "--",
            "/data",
            "/opq",
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "/data:\nkeep.txt\n\n/opq:\nnew1\n");
    // Unknown tag: a network error naming the registry.
    let o = boot_with(
        with_cache(cache.path()),
        &[&format!("{}/busybox:nope", reg.addr), "--", "true"],
    );
    assert_fails_with(&o, &reg.addr);
    assert!(stderr(&o).contains("404"), "{}", stderr(&o));
}

#[test]
fn a_corrupted_blob_is_refused_and_not_cached() {
    let reg = start_registry();
    push(&reg, "busybox", "busybox:latest", "oci");
    // Flip a byte of the biggest stored blob (the layer).
    let (blob, digest) = largest_stored_blob(&reg);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = boot_with(
        with_cache(cache.path()),
        &[&format!("{}/busybox:latest", reg.addr), "--", "true"],
    );
    assert_fails_with(&o, &digest);
    let cached: Vec<_> = files_under(&cache.path().join("blobs"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&digest))
        .collect();
    assert!(
        cached.is_empty(),
        "the corrupt blob reached the cache: {cached:?}"
    );
    assert!(files_under(&cache.path().join("layers")).is_empty());
}

#[test]
fn pull_policies_against_a_stopped_registry() {
    let reg = start_registry();
    push(&reg, "busybox", "web:latest", "oci");
    let reference = format!("{}/web:latest", reg.addr);
    let snaps = tempfile::tempdir().unwrap();
    let (kernel, init) = guest();
    std::env::set_var("SUPERMACHINE_KERNEL", kernel);
    std::env::set_var("SUPERMACHINE_INIT", init);
    let builder = || {
        Image::builder(&reference)
            .name("web")
            .cmd(["httpd", "-f", "-p", "80", "-h", "/var/www"])
            .snapshots_dir(snaps.path())
    };
    // Baking under Always asks the registry for the tag once: the bake resolves its inputs
    // once and boots what it hashed (a second resolution could see a moved tag).
    let tag_gets = || reg.requests("GET /v2/web/manifests/latest");
    let before = tag_gets();
    let image = builder().pull_policy(PullPolicy::Always).build().unwrap();
    assert_eq!(tag_gets() - before, 1, "tag resolutions by one bake");
    let vm = image.start(&VmConfig::default()).unwrap();
    let (_, body) = http_get(vm.connect(80).unwrap(), "/");
    assert_eq!(body, b"<h1>hello from supermachine</h1>\n");
    drop(vm);
    let addr = reg.addr.clone();
    drop(reg);
    // No registry: Missing uses the snapshot without the network; Always needs it.
    builder().pull_policy(PullPolicy::Missing).build().unwrap();
    match builder().pull_policy(PullPolicy::Always).build() {
        Err(Error::Network(msg)) => assert!(msg.contains(&addr), "{msg}"),
        other => panic!("expected Error::Network, got {:?}", other.map(|_| ())),
    }
    let never = Image::builder(&reference)
        .name("other")
        .snapshots_dir(snaps.path())
        .pull_policy(PullPolicy::Never)
        .build();
    assert!(matches!(never, Err(Error::CacheMiss { .. })));
}

#[test]
fn an_interrupted_download_resumes() {
    let reg = start_registry();
    push(&reg, "busybox", "busybox:latest", "oci");
    let (stored, hex) = largest_stored_blob(&reg);
    let bytes = std::fs::read(&stored).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    // What a pull killed half-way through the layer leaves behind.
    std::fs::write(
        blobs.join(format!("{hex}.partial")),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let reference = format!("{}/busybox:latest", reg.addr);
    let o = boot_with(
        with_cache(cache.path()),
        &[&reference, "--", "/bin/sh", "-c", "echo resumed"],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "resumed\n");
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    assert_eq!(std::fs::read(blobs.join(&hex)).unwrap(), bytes);
    assert!(!blobs.join(format!("{hex}.partial")).exists());

    // A damaged partial file is detected, discarded, and the next pull starts over.
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{hex}.partial")),
        vec![0u8; bytes.len() / 2],
    )
    .unwrap();
    let o = boot_with(with_cache(cache.path()), &[&reference, "--", "true"]);
    assert_fails_with(&o, &hex);
    assert!(!blobs.join(format!("{hex}.partial")).exists() && !blobs.join(&hex).exists());
    let o = boot_with(with_cache(cache.path()), &[&reference, "--", "true"]);
    assert_code(&o, 0);
}

#[test]
fn credentials_from_the_docker_config() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(htpasswd.status.success());
    std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).unwrap();
    let reg = start_registry_with(&format!(
        "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
        dir.path().join("htpasswd").display()
    ));
    let st = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            "alice:s3cret",
        ])
        .arg(format!("oci:{}:latest", images().join("busybox").display()))
        .arg(format!("docker://{}/private:latest", reg.addr))
        .status()
        .unwrap();
    assert!(st.success());
    let reference = format!("{}/private:latest", reg.addr);
    let run = |auth: Option<&str>| {
        let cfg = tempfile::tempdir().unwrap();
        if let Some(a) = auth {
            std::fs::write(
                cfg.path().join("config.json"),
                format!(r#"{{"auths":{{"{}":{{"auth":"{a}"}}}}}}"#, reg.addr),
            )
            .unwrap();
        }
        let cache = tempfile::tempdir().unwrap();
        let mut c = with_cache(cache.path());
        c.env("DOCKER_CONFIG", cfg.path());
        boot_with(c, &[&reference, "--", "/bin/sh", "-c", "echo private"])
    };
    // No credentials, wrong ones: a clear 401 naming the registry.
    for auth in [None, Some("YWxpY2U6d3Jvbmc=")] {
        let o = run(auth);
        assert_fails_with(&o, "401");
        assert!(stderr(&o).contains(&reg.addr), "{}", stderr(&o));
    }
    // alice:s3cret
    let o = run(Some("YWxpY2U6czNjcmV0"));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "private\n");
}

#[test]
fn platform_insecure_registry_and_pull_flags() {
    let reg = start_registry();
    push(&reg, "multiarch", "multi:latest", "oci");
    let cache = tempfile::tempdir().unwrap();
    // A registry that is not on loopback by name: requests reach ours through it acting
    // as the HTTP proxy (it serves absolute-form request URIs), so only the scheme the
    // client picks decides whether the pull works.
    let port = reg.addr.rsplit_once(':').unwrap().1;
    let remote = format!("registry.test:{port}");
    let image = format!("{remote}/multi:latest");
    let via_proxy = || {
        let mut c = with_cache(cache.path());
        c.env("HTTP_PROXY", format!("http://{}", reg.addr))
            .env("http_proxy", format!("http://{}", reg.addr))
            .env("NO_PROXY", "")
            .env("no_proxy", "");
        c
    };
    // Not named insecure: HTTPS, which the plain-HTTP registry cannot answer.
    let o = boot_with(via_proxy(), &[&image, "--", "true"]);
    assert_fails_with(&o, &format!("https://{remote}/"));
    let o = boot_with(
        via_proxy(),
        &[
            "--insecure-registry",
            &remote,
            &image,
            "--",
            "sh",
            "-c",
            "echo $ARCH",
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "amd64\n");

    // --platform picks another entry of the index; guests here cannot run arm64.
    let o = boot_with(
        via_proxy(),
        &[
            "--insecure-registry",
            &remote,
            "--platform",
            "linux/arm64",
            &image,
            "--",
            "true",
        ],
    );
    assert_fails_with(&o, "is built for linux/arm64");
    let o = boot_with(
        via_proxy(),
        &[
            "--insecure-registry",
            &remote,
            "--platform",
            "linux/s390x",
            &image,
            "--",
            "true",
        ],
    );
    assert_fails_with(
        &o,
        "has no linux/s390x image (it has: linux/arm64, linux/amd64)",
    );
    let o = boot_with(via_proxy(), &["--platform", "linux", &image, "--", "true"]);
    assert_fails_with(&o, "platform \"linux\"");

    // --pull on boot: never with nothing cached is a cache miss; with the registry gone,
    // missing resolves the tag from the cache and always names the registry it needs.
    let other = format!("{}/multi:latest", reg.addr);
    let o = boot_with(
        with_cache(cache.path()),
        &["--pull", "never", &other, "--", "true"],
    );
    assert_fails_with(&o, "not in the cache");
    let o = boot_with(with_cache(cache.path()), &[&other, "--", "true"]);
    assert_code(&o, 0);
    drop(reg);
    let o = boot_with(
        with_cache(cache.path()),
        &[
            "--pull",
            "never",
            &other,
            "--",
            "sh",
            "-c",
            "echo offline $ARCH",
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "offline amd64\n");
    let o = boot_with(
        with_cache(cache.path()),
        &["--pull", "always", &other, "--", "true"],
    );
    assert_fails_with(&o, &other[..other.find('/').unwrap()]);
}
