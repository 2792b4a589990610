//! Image references the CLI and API accept: `oci-layout:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! and registry references parsed as docker does (`nginx`, `nginx:1.27-alpine`,
//! `ghcr.io/owner/app@sha256:...`, `127.0.0.1:5000/busybox-httpd:layered`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::BakeError;

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

/// A reference to an image in a registry, normalized as docker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, `localhost:5000`, ...
    pub registry: String,
    /// `library/nginx`, `owner/app`.
    pub repository: String,
    /// `None` only when a digest pins the image.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory; `tag` matches `org.opencontainers.image.ref.name`.
    OciLayout {
        dir: PathBuf,
        tag: Option<String>,
    },
    /// A tar of an OCI image layout (as `skopeo copy ... oci-archive:FILE` writes).
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    Registry(RegistryRef),
}

/// `PATH` or `PATH:TAG`: the suffix is a tag only when the whole is not an existing path.
fn split_path_tag(rest: &str, must_exist: impl Fn(&Path) -> bool) -> (PathBuf, Option<String>) {
    if !must_exist(Path::new(rest)) {
        if let Some((path, tag)) = rest.rsplit_once(':') {
            if !tag.is_empty() && !tag.contains('/') && !path.is_empty() {
                return (path.into(), Some(tag.into()));
            }
        }
    }
    (rest.into(), None)
}

fn valid_tag(t: &str) -> bool {
    let mut c = t.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphanumeric() || f == '_')
        && t.len() <= 128
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One path component: lowercase alphanumerics separated by `.`, `_`, `__` or runs of `-`.
fn valid_component(c: &str) -> bool {
    if c.is_empty() || !c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit()) {
        return false;
    }
    if !c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit()) {
        return false;
    }
    let bytes = c.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__`, or one or more `-`.
        let start = i;
        while i < bytes.len() && !(bytes[i].is_ascii_lowercase() || bytes[i].is_ascii_digit()) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (h, Some(p)),
        _ => (r, None),
    };
    let host_ok = if host.starts_with('[') {
        host.ends_with(']')
            && host[1..host.len() - 1]
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':')
    } else {
        host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

impl RegistryRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty reference".into());
        }
        if s.chars().any(|c| c.is_whitespace()) {
            return Err("references contain no whitespace".into());
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or("only sha256 digests are supported")?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(format!("digest {d:?} is not sha256:<64 lowercase hex>"));
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let t = &name[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(format!("invalid tag {t:?}"));
                }
                (&name[..last_slash + i], Some(t.to_string()))
            }
            None => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if !valid_registry(&registry) {
            return Err(format!("invalid registry {registry:?}"));
        }
        if path.is_empty() {
            return Err("missing repository name".into());
        }
        for c in path.split('/') {
            if !valid_component(c) {
                return Err(format!("invalid repository name component {c:?} (lowercase letters, digits, separators)"));
            }
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.len() > 255 {
            return Err("repository name longer than 255 characters".into());
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some(DEFAULT_TAG.to_string())
        } else {
            tag
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, BakeError> {
        let err = |reason: &str| BakeError::Reference {
            reference: s.to_string(),
            reason: reason.into(),
        };
        if let Some(rest) = s.strip_prefix("oci-layout:") {
            if rest.is_empty() {
                return Err(err("expected oci-layout:DIR or oci-layout:DIR:TAG"));
            }
            let (dir, tag) = split_path_tag(rest, |p| p.is_dir());
            return Ok(ImageRef::OciLayout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            if rest.is_empty() {
                return Err(err("expected oci-archive:FILE or oci-archive:FILE:TAG"));
            }
            let (file, tag) = split_path_tag(rest, |p| p.is_file());
            return Ok(ImageRef::OciArchive { file, tag });
        }
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        RegistryRef::parse(rest)
            .map(ImageRef::Registry)
            .map_err(|reason| err(&reason))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::OciLayout { dir, tag: Some(t) } => {
                write!(f, "oci-layout:{}:{t}", dir.display())
            }
            ImageRef::OciLayout { dir, tag: None } => write!(f, "oci-layout:{}", dir.display()),
            ImageRef::OciArchive { file, tag: Some(t) } => {
                write!(f, "oci-archive:{}:{t}", file.display())
            }
            ImageRef::OciArchive { file, tag: None } => write!(f, "oci-archive:{}", file.display()),
            ImageRef::Registry(r) => write!(f, "{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layouts_and_tags() {
        assert_eq!(
            ImageRef::parse("oci-layout:/x/y:v1").unwrap(),
            ImageRef::OciLayout {
                dir: "/x/y".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci-layout:rel").unwrap(),
            ImageRef::OciLayout {
                dir: "rel".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("oci-archive:/tmp/a.tar:latest").unwrap(),
            ImageRef::OciArchive {
                file: "/tmp/a.tar".into(),
                tag: Some("latest".into())
            }
        );
        assert!(ImageRef::parse("oci-layout:").is_err());
        assert!(ImageRef::parse("oci-archive:").is_err());
    }

    fn r(s: &str) -> String {
        RegistryRef::parse(s)
            .map(|r| r.to_string())
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn registry_references_like_docker() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let cases: &[(&str, &str)] = &[
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27-alpine", "docker.io/library/nginx:1.27-alpine"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            (
                "index.docker.io/library/nginx:1",
                "docker.io/library/nginx:1",
            ),
            ("owner/app", "docker.io/owner/app:latest"),
            ("owner/app:v2", "docker.io/owner/app:v2"),
            ("ghcr.io/owner/app", "ghcr.io/owner/app:latest"),
            ("ghcr.io/owner/app:1.0", "ghcr.io/owner/app:1.0"),
            ("ghcr.io/owner/sub/app:1.0", "ghcr.io/owner/sub/app:1.0"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app:x", "localhost:5000/app:x"),
            (
                "127.0.0.1:5000/busybox-httpd:layered",
                "127.0.0.1:5000/busybox-httpd:layered",
            ),
            (
                "registry.example.com:443/a/b",
                "registry.example.com:443/a/b:latest",
            ),
            ("a.b/c__d", "a.b/c__d:latest"),
            ("a.b/c---d.e_f", "a.b/c---d.e_f:latest"),
            ("docker://nginx", "docker.io/library/nginx:latest"),
            ("busybox:_x", "docker.io/library/busybox:_x"),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input)
                .map(|r| r.to_string())
                .unwrap_or_else(|e| format!("ERR {e}"));
            assert_eq!(&got, want, "{input}");
        }
        assert_eq!(
            r(&format!("nginx@{d}")),
            format!("docker.io/library/nginx@{d}")
        );
        assert_eq!(
            r(&format!("nginx:1@{d}")),
            format!("docker.io/library/nginx:1@{d}")
        );
        assert_eq!(r(&format!("ghcr.io/o/a@{d}")), format!("ghcr.io/o/a@{d}"));
    }

    #[test]
    fn invalid_registry_references_are_refused_and_quoted() {
        let bad = [
            "",
            "Nginx",
            "nginx:",
            "nginx:-bad",
            "nginx:a/b",
            "nginx@sha256:abc",
            "nginx@md5:0123",
            "ghcr.io/",
            "ghcr.io/Owner/app",
            "a b",
            "nginx::1",
            "-nginx",
            "nginx-",
            "a..b/c",
            "host:port/app",
            "nginx:tag!",
        ];
        for b in bad {
            let e = ImageRef::parse(b);
            assert!(e.is_err(), "{b:?} parsed as {:?}", e.map(|r| r.to_string()));
            if !b.is_empty() {
                assert!(
                    e.unwrap_err().to_string().contains(&format!("{b:?}")),
                    "error must quote {b:?}"
                );
            }
        }
    }
}
