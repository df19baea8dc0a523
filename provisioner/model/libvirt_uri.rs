//! A connection URI of libvirt's qemu driver, taken apart:
//! `qemu[+TRANSPORT]://[USER@][HOST[:PORT]]/system|session[?PARAMS]`
//! (<https://libvirt.org/uri.html>). The topology checks `[libvirt] uri` and
//! `[hosts.NAME] uri` with it; the libvirt provider learns from it how to
//! reach a remote host's loopback.

use std::collections::BTreeMap;

/// The transports of libvirt's qemu driver URIs (`qemu+TRANSPORT://`).
pub const LIBVIRT_TRANSPORTS: &[&str] = &["ssh", "libssh", "libssh2", "tcp", "tls", "unix", "ext"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtUri {
    /// `ssh`, `tcp`, …; `None` for plain `qemu://`.
    pub transport: Option<String>,
    pub user: Option<String>,
    /// Empty for the local libvirtd.
    pub host: String,
    pub port: Option<u16>,
    /// `system` or `session`.
    pub driver: String,
    /// The query's parameters, percent-decoded (`keyfile`, `known_hosts`, …).
    pub params: BTreeMap<String, String>,
}

impl LibvirtUri {
    /// The URI's parts, or why it is not a qemu driver URI (one phrase).
    pub fn parse(uri: &str) -> Result<LibvirtUri, String> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err("it has no `://`".into());
        };
        let transport = match scheme.split_once('+') {
            None if scheme == "qemu" => None,
            Some(("qemu", transport)) if LIBVIRT_TRANSPORTS.contains(&transport) => {
                Some(transport.to_owned())
            }
            Some(("qemu", transport)) => return Err(format!("unknown transport `{transport}`")),
            _ => {
                return Err(format!(
                    "the scheme must be `qemu` or `qemu+TRANSPORT` (testbed drives libvirt's \
                     qemu driver), not `{scheme}`"
                ))
            }
        };
        let path_at = rest
            .find('/')
            .ok_or("it has no path (`/system` or `/session`)")?;
        let (authority, tail) = rest.split_at(path_at);
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let driver = match path.trim_end_matches('/') {
            "/system" => "system",
            "/session" => "session",
            other => {
                return Err(format!(
                    "its path must be `/system` or `/session`, not `{other}`"
                ))
            }
        };
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(decode(user)), host),
            None => (None, authority),
        };
        let (host, port) = split_port(host_port)?;
        if host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("`{host}` is not a host name"));
        }
        Ok(LibvirtUri {
            transport,
            user,
            host: host.to_owned(),
            port,
            driver: driver.to_owned(),
            params: params(query),
        })
    }

    /// Whether the libvirtd is on another machine.
    pub fn is_remote(&self) -> bool {
        !self.host.is_empty()
    }

    /// Whether SSH carries the connection (`qemu+ssh`, `+libssh`, `+libssh2`).
    pub fn over_ssh(&self) -> bool {
        matches!(
            self.transport.as_deref(),
            Some("ssh" | "libssh" | "libssh2")
        )
    }
}

/// `HOST[:PORT]`; a bracketed IPv6 address keeps its colons.
fn split_port(host_port: &str) -> Result<(&str, Option<u16>), String> {
    let colon = match host_port.strip_prefix('[') {
        Some(inner) => inner
            .find(']')
            .map(|end| end + 2)
            .filter(|at| host_port[*at..].starts_with(':')),
        None => host_port.rfind(':'),
    };
    let Some(colon) = colon else {
        return Ok((host_port, None));
    };
    let (host, port) = (&host_port[..colon], &host_port[colon + 1..]);
    port.parse::<u16>()
        .map(|port| (host, Some(port)))
        .map_err(|_| format!("`{port}` is not a port"))
}

fn params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_uri_comes_apart() {
        let uri = LibvirtUri::parse(
            "qemu+ssh://root@10.77.0.2:2222/system?keyfile=/k/id%20host&known_hosts=/k/kh",
        )
        .expect("parses");
        assert_eq!(uri.transport.as_deref(), Some("ssh"));
        assert_eq!(uri.user.as_deref(), Some("root"));
        assert_eq!((uri.host.as_str(), uri.port), ("10.77.0.2", Some(2222)));
        assert_eq!(uri.driver, "system");
        assert_eq!(uri.params["keyfile"], "/k/id host");
        assert_eq!(uri.params["known_hosts"], "/k/kh");
        assert!(uri.is_remote() && uri.over_ssh());
    }

    #[test]
    fn local_uris_have_no_host() {
        for text in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system?socket=/tmp/tb-x/sock/libvirt-sock",
        ] {
            let uri = LibvirtUri::parse(text).expect(text);
            assert!(!uri.is_remote(), "{text}");
        }
        let v6 = LibvirtUri::parse("qemu+tcp://[fd00::2]:16509/system").expect("v6");
        assert_eq!((v6.host.as_str(), v6.port), ("[fd00::2]", Some(16509)));
    }

    #[test]
    fn what_is_not_a_qemu_uri_says_why() {
        for (text, why) in [
            ("10.77.0.2", "no `://`"),
            ("xen:///system", "the scheme must be"),
            ("qemu+shh://h/system", "unknown transport `shh`"),
            ("qemu+ssh://h", "no path"),
            ("qemu+ssh://h/sytem", "must be `/system` or `/session`"),
            ("qemu+ssh://h:ssh/system", "`ssh` is not a port"),
        ] {
            let error = LibvirtUri::parse(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
        }
    }
}
