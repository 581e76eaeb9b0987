//! Target URLs: `tcp://HOST:PORT[/NQN]`.
//!
//! One string names everything a run needs to reach a namespace's subsystem, so scenario
//! files and scripts pass a single value. HOST may be a name, an IPv4 address or a bracketed
//! IPv6 address; PORT defaults to 4420 (the NVMe/TCP port) when left out. Without an NQN the
//! harness asks the discovery controller at the same address and takes the first NVM
//! subsystem. Parsing never resolves names and never panics: every malformed URL is a
//! [`PerfError::Url`] that says which part is wrong.

use std::fmt;

use crate::PerfError;

/// The IANA port of NVMe/TCP (used by both I/O and discovery controllers).
pub const DEFAULT_PORT: u16 = 4420;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl {
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Subsystem NQN; `None` means "ask discovery".
    pub nqn: Option<String>,
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<TargetUrl, PerfError> {
        let bad = |reason: &str| PerfError::Url { url: url.to_string(), reason: reason.to_string() };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("missing scheme"));
        };
        if !scheme.eq_ignore_ascii_case("tcp") {
            return Err(bad(&format!("unsupported transport {scheme:?}; only tcp is supported")));
        }
        let (authority, nqn) = match rest.split_once('/') {
            Some((a, n)) => (a, Some(n)),
            None => (rest, None),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(bad("unterminated [IPv6] address"));
            };
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return Err(bad("junk after ]; expected :PORT")),
                },
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad(&format!("{h:?} is not an IPv6 address")));
            }
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad("IPv6 addresses must be in brackets, e.g. tcp://[::1]:4420")),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')) {
            return Err(bad(&format!("host {host:?} has characters a host name cannot have")));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err(bad("port 0 is not a port a target listens on")),
                Ok(n) => n,
                Err(_) => return Err(bad(&format!("port {p:?} is not a number from 1 to 65535"))),
            },
        };
        let nqn = match nqn {
            None | Some("") => None,
            Some(n) => {
                if n.len() > stager_nvme::fabrics::NQN_MAX_BYTES {
                    return Err(bad(&format!(
                        "NQN is {} bytes, longer than the {} NVMe allows",
                        n.len(),
                        stager_nvme::fabrics::NQN_MAX_BYTES
                    )));
                }
                if n.contains('/') || n.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(bad("NQN contains '/', whitespace or control characters"));
                }
                Some(n.to_string())
            }
        };
        Ok(TargetUrl { host: host.to_string(), port, nqn })
    }

    /// `host:port` as `ToSocketAddrs` and messages want it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same URL naming a subsystem.
    pub fn with_nqn(&self, nqn: &str) -> TargetUrl {
        TargetUrl { nqn: Some(nqn.to_string()), ..self.clone() }
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp://{}", self.authority())?;
        if let Some(n) = &self.nqn {
            write!(f, "/{n}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for TargetUrl {
    type Err = PerfError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetUrl::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls() {
        let u = TargetUrl::parse("tcp://127.0.0.1:4420/nqn.2026-11.dev.stager:default").unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 4420);
        assert_eq!(u.nqn.as_deref(), Some("nqn.2026-11.dev.stager:default"));
        assert_eq!(u.to_string(), "tcp://127.0.0.1:4420/nqn.2026-11.dev.stager:default");

        let u = TargetUrl::parse("tcp://localhost:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.nqn), ("localhost", 9000, None));
        let u = TargetUrl::parse("TCP://10.0.0.1/").unwrap();
        assert_eq!((u.port, u.nqn), (DEFAULT_PORT, None));
        let u = TargetUrl::parse("tcp://[::1]:4421/nqn.x:y").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:4421");
        assert_eq!(TargetUrl::parse(&u.to_string()).unwrap(), u);
        assert_eq!(TargetUrl::parse("tcp://[fe80::1]").unwrap().port, DEFAULT_PORT);
    }

    #[test]
    fn bad_urls_say_why() {
        let cases = [
            ("", "missing scheme"),
            ("127.0.0.1:4420", "missing scheme"),
            ("rdma://127.0.0.1:4420", "unsupported transport"),
            ("tcp://", "empty host"),
            ("tcp://:4420", "empty host"),
            ("tcp://host:", "port \"\""),
            ("tcp://host:99999", "1 to 65535"),
            ("tcp://host:0", "port 0"),
            ("tcp://host:-1", "not a number"),
            ("tcp://::1:4420", "brackets"),
            ("tcp://[::1", "unterminated"),
            ("tcp://[::1]x", "junk"),
            ("tcp://[zz]:1", "not an IPv6"),
            ("tcp://ho st:1", "characters"),
            ("tcp://h:1/a/b", "'/'"),
            ("tcp://h:1/nqn with space", "whitespace"),
        ];
        for (url, want) in cases {
            match TargetUrl::parse(url) {
                Ok(u) => panic!("{url:?} parsed as {u:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{url:?}: {msg:?} does not mention {want:?}");
                    assert_eq!(e.exit_code(), crate::EXIT_USAGE);
                }
            }
        }
        let long = format!("tcp://h:1/{}", "n".repeat(300));
        assert!(TargetUrl::parse(&long).unwrap_err().to_string().contains("longer"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap fuzz: every prefix of a few tricky strings, and some odd characters.
        let seeds = ["tcp://[::1]:4420/nqn.a:b", "tcp://127.0.0.1:4420/x", "tcp://é:1/ü", "tcp://[]:/"];
        for s in seeds {
            for (i, _) in s.char_indices() {
                let _ = TargetUrl::parse(&s[..i]);
                let _ = TargetUrl::parse(&s[i..]);
            }
        }
    }
}
