//! Which proxy, if any, a request goes through, from the environment, by the rules the
//! registry client has always followed: `HTTP_PROXY` / `http_proxy` for `http://` URLs,
//! `HTTPS_PROXY` / `https_proxy` for `https://`, `ALL_PROXY` / `all_proxy` for either when
//! the scheme's own is unset or unusable, and hosts matched by `NO_PROXY` / `no_proxy`
//! (exact names and their subdomains, `.suffix`, `*`, IP addresses and CIDR networks) go
//! direct. Nothing is proxied when `REQUEST_METHOD` is set (a CGI environment, where
//! `HTTP_PROXY` may come from a request header).

use std::net::IpAddr;

/// The proxy (as written in the environment) for `url`, or `None` for a direct connection.
pub(crate) fn for_url(url: &str) -> Option<String> {
    for_url_with(url, |name| std::env::var(name).ok())
}

fn for_url_with(url: &str, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    if env("REQUEST_METHOD").is_some() {
        return None;
    }
    let first = |names: &[&str]| names.iter().find_map(|n| env(n)).unwrap_or_default();
    let (scheme, host) = scheme_and_host(url)?;
    if no_proxy_matches(&first(&["NO_PROXY", "no_proxy"]), host) {
        return None;
    }
    let own = match scheme.to_ascii_lowercase().as_str() {
        "http" => first(&["HTTP_PROXY", "http_proxy"]),
        "https" => first(&["HTTPS_PROXY", "https_proxy"]),
        _ => return None,
    };
    usable(own).or_else(|| usable(first(&["ALL_PROXY", "all_proxy"])))
}

/// A proxy value that names a host (`http://`, `https://`, `socks…://` or a bare
/// `host[:port]`).
fn usable(v: String) -> Option<String> {
    let v = v.trim().to_string();
    let rest = v.split_once("://").map_or(v.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then_some(v)
}

/// The scheme and host (IPv6 without brackets) of an absolute URL.
fn scheme_and_host(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split_once(']').map_or(v6, |(h, _)| h)
    } else {
        hostport.split_once(':').map_or(hostport, |(h, _)| h)
    };
    Some((scheme, host))
}

/// Whether `host` is listed in a `NO_PROXY` value.
fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<IpAddr>().ok();
    list.split(',').map(str::trim).any(|entry| {
        if entry.is_empty() {
            return false;
        }
        if let Some(net) = parse_net(entry) {
            return ip.is_some_and(|ip| net_contains(net, ip));
        }
        if ip.is_some() {
            return false;
        }
        if entry == "*" {
            return true;
        }
        let bare = entry.strip_prefix('.').unwrap_or(entry);
        if host.eq_ignore_ascii_case(bare) {
            return true;
        }
        // A subdomain of the entry.
        host.len() > bare.len()
            && host[host.len() - bare.len()..].eq_ignore_ascii_case(bare)
            && host.as_bytes()[host.len() - bare.len() - 1] == b'.'
    })
}

/// An IP address (a full-length prefix) or an `address/prefix` network.
fn parse_net(entry: &str) -> Option<(IpAddr, u32)> {
    let (addr, len) = match entry.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u32>().ok()?)),
        None => (entry.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((addr, len))
}

fn net_contains((net, len): (IpAddr, u32), ip: IpAddr) -> bool {
    let mask = |bits: u32, width: u32| -> u128 {
        if bits == 0 {
            0
        } else {
            (!0u128 << (width - bits)) & (!0u128 >> (128 - width))
        }
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let m = mask(len, 32);
            (u32::from(n) as u128 & m) == (u32::from(i) as u128 & m)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let m = mask(len, 128);
            (u128::from(n) & m) == (u128::from(i) & m)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn scheme_specific_then_all() {
        let env = [
            ("HTTP_PROXY", "http://p:3128"),
            ("ALL_PROXY", "socks5://s:1080"),
        ];
        assert_eq!(
            for_url_with("http://r.test:5000/v2/", with(&env)).as_deref(),
            Some("http://p:3128")
        );
        assert_eq!(
            for_url_with("https://r.test/v2/", with(&env)).as_deref(),
            Some("socks5://s:1080")
        );
        let env = [("HTTP_PROXY", "http://p:3128")];
        assert_eq!(for_url_with("https://r.test/v2/", with(&env)), None);
        // Uppercase wins; an empty value falls back to ALL_PROXY.
        let env = [
            ("HTTPS_PROXY", ""),
            ("https_proxy", "http://lower:1"),
            ("all_proxy", "http://all:2"),
        ];
        assert_eq!(
            for_url_with("https://r.test/", with(&env)).as_deref(),
            Some("http://all:2")
        );
        let env = [("HTTP_PROXY", "http://p:1"), ("REQUEST_METHOD", "GET")];
        assert_eq!(for_url_with("http://r.test/", with(&env)), None);
    }

    #[test]
    fn no_proxy() {
        let env = [
            ("HTTP_PROXY", "http://p:3128"),
            (
                "NO_PROXY",
                "localhost, .internal, example.com, 10.0.0.0/8, ::1",
            ),
        ];
        for direct in [
            "http://localhost:5000/v2/",
            "http://a.b.internal/",
            "http://example.com/",
            "http://www.EXAMPLE.com/",
            "http://10.1.2.3:5000/",
            "http://[::1]:5000/",
            "http://user:pw@localhost/",
        ] {
            assert_eq!(for_url_with(direct, with(&env)), None, "{direct}");
        }
        for proxied in [
            "http://notexample.com/",
            "http://11.0.0.1/",
            "http://127.0.0.1:5000/",
            "http://registry.test:5000/",
        ] {
            assert!(for_url_with(proxied, with(&env)).is_some(), "{proxied}");
        }
        let env = [("HTTP_PROXY", "http://p:3128"), ("no_proxy", "*")];
        assert_eq!(for_url_with("http://anything/", with(&env)), None);
        let env = [("HTTP_PROXY", "http://p:3128"), ("NO_PROXY", "")];
        assert!(for_url_with("http://localhost/", with(&env)).is_some());
    }
}
