//! Registry credentials from docker's config file: `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`, `auths.<registry>.auth` = base64("user:password") (or
//! `username` + `password`). Credential helpers are not consulted.

use std::path::PathBuf;

use base64::Engine as _;

fn config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://index.docker.io/v1/` -> `index.docker.io`; docker's aliases fold to docker.io.
fn normalize(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// (user, password) for `registry`, if the config has them.
pub fn lookup(registry: &str) -> Option<(String, String)> {
    let text = std::fs::read_to_string(config_path()?).ok()?;
    lookup_in(&text, registry)
}

fn lookup_in(config: &str, registry: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    let want = normalize(registry);
    let (_, entry) = v
        .get("auths")?
        .as_object()?
        .iter()
        .find(|(k, _)| normalize(k) == want)?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (u, p) = decoded.split_once(':')?;
        return Some((u.to_string(), p.to_string()));
    }
    let u = entry.get("username")?.as_str()?;
    let p = entry.get("password")?.as_str()?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_credentials_by_registry() {
        let cfg = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"ZG9ja2VyOmh1Yg=="},
            "127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"},
            "ghcr.io":{"username":"bob","password":"pw"}}}"#;
        assert_eq!(
            lookup_in(cfg, "docker.io"),
            Some(("docker".into(), "hub".into()))
        );
        assert_eq!(
            lookup_in(cfg, "127.0.0.1:5000"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(lookup_in(cfg, "ghcr.io"), Some(("bob".into(), "pw".into())));
        assert_eq!(lookup_in(cfg, "quay.io"), None);
        assert_eq!(lookup_in("not json", "ghcr.io"), None);
    }
}
