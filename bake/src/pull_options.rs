//! How an image source is read: the pull policy, the platform picked from a multi-arch
//! index, which registries speak plain HTTP, and how many blobs download at once.

use std::fmt;

use crate::BakeError;

/// When to read an image's source (registry, layout, archive) again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Re-read the source every time; re-bake only if what it resolves to changed.
    Always,
    /// Use what is cached (without touching the network); read the source otherwise.
    #[default]
    Missing,
    /// Only what is cached: nothing cached is `CacheMiss`, a broken cache `CacheInvalid`.
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "missing" => Ok(Self::Missing),
            "never" => Ok(Self::Never),
            _ => Err(format!(
                "pull policy {s:?}: expected always, missing or never"
            )),
        }
    }
}

/// `os/architecture[/variant]`, as docker's `--platform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    /// The platform our guests run: linux/amd64.
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self, BakeError> {
        let bad = |reason: &str| BakeError::Unsupported(format!("platform {s:?}: {reason}"));
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad("expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64"));
        }
        if !parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(bad("only letters, digits and '_' are allowed"));
        }
        Ok(Self {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }

    /// Whether an index entry's `platform` object is this platform. A variant is only
    /// compared when this platform names one.
    pub fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"] == self.os.as_str()
            && p["architecture"] == self.architecture.as_str()
            && match self.variant.as_deref() {
                Some(v) => p["variant"].as_str() == Some(v),
                None => true,
            }
    }

    /// How an index entry's `platform` reads, for error messages.
    pub fn describe(p: &serde_json::Value) -> String {
        let mut s = format!(
            "{}/{}",
            p["os"].as_str().unwrap_or("?"),
            p["architecture"].as_str().unwrap_or("?")
        );
        if let Some(v) = p["variant"].as_str() {
            s = format!("{s}/{v}");
        }
        s
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Everything about reading an image source that is not the reference itself.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub policy: PullPolicy,
    pub platform: Platform,
    /// Registries (`host` or `host:port`) reached over plain HTTP, besides localhost and
    /// 127.0.0.0/8, which always are.
    pub insecure_registries: Vec<String>,
    /// Blobs downloaded at the same time.
    pub max_concurrent_downloads: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            policy: PullPolicy::Missing,
            platform: Platform::default(),
            insecure_registries: Vec::new(),
            max_concurrent_downloads: 3,
        }
    }
}

impl PullOptions {
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        self.insecure_registries
            .iter()
            .any(|r| r == registry || r == host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(p.matches(&json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        assert!(!p.matches(&json!({"os": "linux", "architecture": "arm64", "variant": "v7"})));
        let amd = Platform::default();
        assert_eq!(Platform::parse("LINUX/AMD64").unwrap(), amd);
        assert!(amd.matches(&json!({"os": "linux", "architecture": "amd64", "variant": "v3"})));
        assert!(!amd.matches(&json!({"os": "windows", "architecture": "amd64"})));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn insecure_registries() {
        let o = PullOptions {
            insecure_registries: vec!["registry.lan:5000".into(), "plain.lan".into()],
            ..Default::default()
        };
        assert!(o.is_insecure("registry.lan:5000"));
        assert!(!o.is_insecure("registry.lan:5001"));
        assert!(o.is_insecure("plain.lan:8080"));
        assert!(!o.is_insecure("ghcr.io"));
        assert_eq!("never".parse::<PullPolicy>().unwrap(), PullPolicy::Never);
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
