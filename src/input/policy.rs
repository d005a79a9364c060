//! Which sources may be read: local paths or not, and which network
//! addresses may be reached.
//!
//! The command line reads whatever its user names. A server fetching URLs
//! that strangers send must not become their way into its own network: the
//! cloud's metadata service (169.254.169.254), the pod network, the
//! loopback interface. Host names are checked where they are resolved (a
//! resolver that drops refused addresses), so a name cannot pass a check and
//! then resolve elsewhere; address literals, which skip the resolver, are
//! checked before each request and on every redirect. An operator can
//! open ranges of addresses (`--allow-address`): a registry on the pod
//! network, say.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::Source;

/// What a fetcher may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Whether local paths are read.
    pub local_files: bool,
    /// Whether loopback, private, link-local and other non-public addresses
    /// may be reached.
    pub private_addresses: bool,
    /// Ranges reached even though they are not public.
    pub allowed: Vec<IpNet>,
}

/// Redirects followed by a policy that restricts addresses, each hop
/// checked.
pub const MAX_REDIRECTS_RESTRICTED: usize = 5;
/// The command line's: ten requests in all, as it always followed.
const MAX_REDIRECTS: usize = 9;

/// Why the policy refused a source; the message a record carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl SourcePolicy {
    /// Everything: the command line's policy, where the user names the sources.
    pub const ALLOW_ALL: SourcePolicy =
        SourcePolicy { local_files: true, private_addresses: true, allowed: Vec::new() };
    /// Public network addresses only, no local files.
    pub const PUBLIC_ONLY: SourcePolicy =
        SourcePolicy { local_files: false, private_addresses: false, allowed: Vec::new() };

    /// This policy, reaching `ranges` too.
    pub fn allowing(mut self, ranges: impl IntoIterator<Item = IpNet>) -> SourcePolicy {
        self.allowed.extend(ranges);
        self
    }

    /// Checks what can be checked before a request: the kind of source, and
    /// a host that is an address literal.
    pub fn check(&self, source: &Source) -> Result<(), Denied> {
        match source {
            Source::Path(_) if !self.local_files => Err(Denied("local files are not allowed".into())),
            Source::Path(_) => Ok(()),
            Source::Url(url) => self.check_url(url),
        }
    }

    fn check_url(&self, url: &Url) -> Result<(), Denied> {
        if self.private_addresses {
            return Ok(());
        }
        let host = url.host_str().unwrap_or_default();
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        match literal.parse::<IpAddr>() {
            Ok(ip) => self.check_address(ip),
            // A name: resolved by `PolicyResolver`, where its addresses are checked.
            Err(_) => Ok(()),
        }
    }

    /// Whether `ip` may be reached.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), Denied> {
        // ::ffff:a.b.c.d is a.b.c.d, for the allowed ranges as for the rules.
        let canonical = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        if self.allowed.iter().any(|range| range.contains(&canonical)) {
            return Ok(());
        }
        match restricted_range(ip) {
            Some(range) if !self.private_addresses => Err(Denied(format!("address {ip} is not allowed ({range})"))),
            _ => Ok(()),
        }
    }

    /// The resolver a client needs to enforce this policy on host names;
    /// none when every address is allowed (the system's own resolver then).
    pub(super) fn resolver(&self) -> Option<Arc<dyn Resolve>> {
        (!self.private_addresses).then(|| Arc::new(PolicyResolver { policy: self.clone() }) as Arc<dyn Resolve>)
    }

    /// Redirects, at most 5 where addresses are restricted (9 otherwise),
    /// each to a URL the policy allows; its host name is checked where it
    /// is resolved.
    pub(super) fn redirects(&self) -> reqwest::redirect::Policy {
        let policy = self.clone();
        let most = if policy.private_addresses { MAX_REDIRECTS } else { MAX_REDIRECTS_RESTRICTED };
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > most {
                return attempt.error("too many redirects");
            }
            match policy.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(denied) => attempt.error(denied),
            }
        })
    }
}

/// The name of the non-public range `ip` falls in, if any. Everything a
/// stranger should not reach through the server: this host, its networks,
/// the cloud's metadata addresses, and what is not unicast on the Internet.
pub fn restricted_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => restricted_v4(ip),
        IpAddr::V6(ip) => restricted_v6(ip),
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private network",
        // 169.254.169.254 is the metadata service of most clouds.
        _ if ip.is_link_local() => "link-local",
        _ if a == 0 => "this network",
        // Carrier-grade NAT; Alibaba Cloud's metadata service is 100.100.100.200.
        _ if a == 100 && (64..128).contains(&b) => "shared address space",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol assignments",
        _ if ip.is_documentation() => "documentation",
        _ if a == 198 && (18..20).contains(&b) => "benchmarking",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() || a >= 240 => "reserved",
        _ => return None,
    })
}

fn restricted_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // An IPv4 address written as IPv6 reaches that IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return restricted_v4(v4);
    }
    let segments = ip.segments();
    Some(match segments {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        // Unique local addresses (AWS's IPv6 metadata service, fd00:ec2::254).
        [s, ..] if s & 0xfe00 == 0xfc00 => "unique local",
        [s, ..] if s & 0xffc0 == 0xfe80 => "link-local",
        [s, ..] if s & 0xffc0 == 0xfec0 => "site-local",
        // NAT64 reaches the IPv4 address in its last 32 bits.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            return restricted_v4(Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
        }
        // IPv4-compatible addresses (deprecated), ::a.b.c.d.
        [0, 0, 0, 0, 0, 0, _, _] => "IPv4-compatible",
        [0x2001, 0xdb8, ..] => "documentation",
        [0x100, 0, 0, 0, ..] => "discard-only",
        _ => return None,
    })
}

/// Resolves host names with the system's resolver and keeps only the
/// addresses the policy allows; a name with none left is refused.
struct PolicyResolver {
    policy: SourcePolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|addr| match policy.check_address(addr.ip()) {
                    Ok(()) => true,
                    Err(denied) => {
                        refused.get_or_insert(denied);
                        false
                    }
                })
                .collect();
            if allowed.is_empty()
                && let Some(Denied(reason)) = refused
            {
                return Err(Box::new(Denied(format!("{host}: {reason}"))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_restricted() {
        for (address, range) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private network"),
            ("172.16.0.1", "private network"),
            ("172.31.255.255", "private network"),
            ("192.168.1.1", "private network"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "this network"),
            ("100.64.0.1", "shared address space"),
            ("100.100.100.200", "shared address space"),
            ("192.0.0.170", "IETF protocol assignments"),
            ("198.18.0.1", "benchmarking"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("240.0.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique local"),
            ("fd00:ec2::254", "unique local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:10.1.2.3", "private network"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::7f00:1", "loopback"),
            ("::7f00:1", "IPv4-compatible"),
            ("2001:db8::1", "documentation"),
        ] {
            assert_eq!(restricted_range(ip(address)), Some(range), "{address}");
        }
    }

    #[test]
    fn public_addresses_are_not() {
        for address in
            ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "169.255.0.1", "2606:4700::1111", "64:ff9b::808:808"]
        {
            assert_eq!(restricted_range(ip(address)), None, "{address}");
        }
    }

    #[test]
    fn the_policy_refuses_what_it_does_not_allow() {
        let public = SourcePolicy::PUBLIC_ONLY;
        let all = SourcePolicy::ALLOW_ALL;
        let source = |s: &str| Source::parse(s).unwrap();
        assert_eq!(public.check(&source("photos/a.jpg")).unwrap_err().to_string(), "local files are not allowed");
        assert!(all.check(&source("photos/a.jpg")).is_ok());
        let metadata = source("http://169.254.169.254/latest/meta-data/");
        assert_eq!(
            public.check(&metadata).unwrap_err().to_string(),
            "address 169.254.169.254 is not allowed (link-local)"
        );
        assert!(all.check(&metadata).is_ok());
        assert!(public.check(&source("http://[::1]:8080/a.jpg")).is_err());
        assert!(public.check(&source("http://[::ffff:127.0.0.1]/a.jpg")).is_err());
        // Names are checked once resolved, not here.
        assert!(public.check(&source("https://example.org/a.jpg")).is_ok());
        assert!(public.check(&source("https://8.8.8.8/a.jpg")).is_ok());
    }

    #[test]
    fn allowed_ranges_open_only_themselves() {
        let policy =
            SourcePolicy::PUBLIC_ONLY.allowing(["127.0.0.1/32".parse().unwrap(), "fd00::/64".parse().unwrap()]);
        assert!(policy.check_address(ip("127.0.0.1")).is_ok());
        assert!(policy.check_address(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check_address(ip("fd00::5")).is_ok());
        assert_eq!(
            policy.check_address(ip("127.0.0.2")).unwrap_err().to_string(),
            "address 127.0.0.2 is not allowed (loopback)"
        );
        assert!(policy.check_address(ip("fd00:0:0:1::5")).is_err());
        assert!(policy.check_address(ip("169.254.169.254")).is_err());
        assert!(policy.check_address(ip("8.8.8.8")).is_ok());
        // Still no local files.
        assert!(policy.check(&Source::parse("a.jpg").unwrap()).is_err());
    }
}
