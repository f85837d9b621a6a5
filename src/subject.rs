//! Who a request is charged to: API key, organisation and IP cluster.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The three kinds of subject every request is charged to.
///
/// # Examples
///
/// ```
/// use ratewarden::SubjectKind;
/// assert_eq!(SubjectKind::IpCluster.as_str(), "ip_cluster");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    /// The API key that authenticated the request.
    ApiKey,
    /// The organisation (account) that owns the key.
    Org,
    /// The client address, truncated to a prefix (IPv4 /24 and IPv6 /48 by default).
    IpCluster,
}

impl SubjectKind {
    /// All kinds, in the order a check evaluates them.
    pub const ALL: [SubjectKind; 3] = [
        SubjectKind::ApiKey,
        SubjectKind::Org,
        SubjectKind::IpCluster,
    ];

    /// The snake-case name used in denial reasons (`api_key:requests_per_minute`).
    pub const fn as_str(self) -> &'static str {
        match self {
            SubjectKind::ApiKey => "api_key",
            SubjectKind::Org => "org",
            SubjectKind::IpCluster => "ip_cluster",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            SubjectKind::ApiKey => 0,
            SubjectKind::Org => 1,
            SubjectKind::IpCluster => 2,
        }
    }
}

impl fmt::Display for SubjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A network prefix that groups nearby client addresses into one subject.
///
/// IPv4 and IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are both treated as IPv4.
///
/// # Examples
///
/// ```
/// use ratewarden::IpCluster;
/// use std::net::IpAddr;
///
/// let a: IpAddr = "198.51.100.23".parse().unwrap();
/// let b: IpAddr = "::ffff:198.51.100.200".parse().unwrap();
/// assert_eq!(IpCluster::new(a, 24, 48), IpCluster::new(b, 24, 48));
/// assert_eq!(IpCluster::new(a, 24, 48).to_string(), "198.51.100.0/24");
/// let v6: IpAddr = "2001:db8:abcd:12::1".parse().unwrap();
/// assert_eq!(IpCluster::new(v6, 24, 48).to_string(), "2001:db8:abcd::/48");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpCluster {
    /// Network bits; an IPv4 network is stored in its IPv4-mapped IPv6 form.
    bits: u128,
    /// Prefix length in the address family's own terms (≤ 32 for IPv4, ≤ 128 for IPv6).
    prefix: u8,
    v4: bool,
}

impl IpCluster {
    /// Groups `ip` by `v4_prefix` (0..=32) or `v6_prefix` (0..=128) bits; longer prefixes are
    /// clamped to the family's width.
    pub fn new(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::from_v4(v4, v4_prefix),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::from_v4(v4, v4_prefix),
                None => {
                    let p = v6_prefix.min(128);
                    let mask = if p == 0 {
                        0
                    } else {
                        u128::MAX << (128 - u32::from(p))
                    };
                    Self {
                        bits: u128::from(v6) & mask,
                        prefix: p,
                        v4: false,
                    }
                }
            },
        }
    }

    fn from_v4(v4: Ipv4Addr, prefix: u8) -> Self {
        let p = prefix.min(32);
        let mask = if p == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(p))
        };
        let net = u32::from(v4) & mask;
        Self {
            bits: (0xffff_u128 << 32) | u128::from(net),
            prefix: p,
            v4: true,
        }
    }

    /// The cluster as one integer key (the network bits, IPv4 in mapped form).
    pub fn bits(&self) -> u128 {
        self.bits
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.v4
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        if self.v4 {
            IpAddr::V4(Ipv4Addr::from(self.bits as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.bits))
        }
    }
}

impl fmt::Display for IpCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// A subject named by kind and id, as used in overrides, manual controls and events.
///
/// The id of an IP cluster is its text form, for example `198.51.100.0/24`.
///
/// # Examples
///
/// ```
/// use ratewarden::{SubjectId, SubjectKind};
/// let s = SubjectId::org("org-acme");
/// assert_eq!(s.kind, SubjectKind::Org);
/// assert_eq!(s.to_string(), "org:org-acme");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SubjectId {
    /// The kind of subject.
    pub kind: SubjectKind,
    /// The key, the org name, or the cluster in CIDR text form.
    pub id: String,
}

impl SubjectId {
    /// An API key subject.
    pub fn api_key(id: impl Into<String>) -> Self {
        Self {
            kind: SubjectKind::ApiKey,
            id: id.into(),
        }
    }

    /// An organisation subject.
    pub fn org(id: impl Into<String>) -> Self {
        Self {
            kind: SubjectKind::Org,
            id: id.into(),
        }
    }

    /// The IP cluster subject of a cluster.
    pub fn ip_cluster(cluster: IpCluster) -> Self {
        Self {
            kind: SubjectKind::IpCluster,
            id: cluster.to_string(),
        }
    }
}

impl fmt::Display for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.id)
    }
}

/// The text is not `kind:id` with a known kind and a non-empty id (see
/// [`SubjectId`]'s `FromStr`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a subject: write api_key:<key>, org:<org> or ip_cluster:<network>/<prefix>")]
pub struct ParseSubjectError(String);

/// Parses the `kind:id` form that [`Display`](fmt::Display) writes (and escalation events
/// carry): `api_key:sk-…`, `org:org-acme`, `ip_cluster:198.51.100.0/24`. A cluster's network
/// is checked when the id is used ([`ControlError::BadCluster`](crate::ControlError)).
///
/// # Examples
///
/// ```
/// use ratewarden::{SubjectId, SubjectKind};
/// let s: SubjectId = "ip_cluster:2001:db8::/48".parse().unwrap();
/// assert_eq!((s.kind, s.id.as_str()), (SubjectKind::IpCluster, "2001:db8::/48"));
/// assert_eq!(s.to_string().parse::<SubjectId>().unwrap(), s);
/// assert!("user:alice".parse::<SubjectId>().is_err());
/// ```
impl std::str::FromStr for SubjectId {
    type Err = ParseSubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseSubjectError(s.to_string());
        let (kind, id) = s.split_once(':').ok_or_else(bad)?;
        let kind = [
            SubjectKind::ApiKey,
            SubjectKind::Org,
            SubjectKind::IpCluster,
        ]
        .into_iter()
        .find(|k| k.as_str() == kind)
        .ok_or_else(bad)?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            kind,
            id: id.to_string(),
        })
    }
}

/// Parses `a.b.c.d/len` or `v6::/len` into a cluster with that exact prefix.
pub(crate) fn parse_cidr(s: &str) -> Option<IpCluster> {
    let (addr, len) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    match ip {
        IpAddr::V4(_) if len <= 32 => Some(IpCluster::new(ip, len, 128)),
        IpAddr::V6(v6) if len <= 128 && v6.to_ipv4_mapped().is_none() => {
            Some(IpCluster::new(ip, 32, len))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_ids_parse_what_they_display() {
        let cluster = IpCluster::new("203.0.113.9".parse().unwrap(), 24, 48);
        for s in [
            SubjectId::api_key("sk-proj-a:b"),
            SubjectId::org("org-acme"),
            SubjectId::ip_cluster(cluster),
            SubjectId::ip_cluster(IpCluster::new("2001:db8::1".parse().unwrap(), 24, 48)),
        ] {
            assert_eq!(s.to_string().parse::<SubjectId>(), Ok(s.clone()), "{s}");
        }
        for bad in [
            "",
            "sk-1",
            ":x",
            "api_key:",
            "key:sk-1",
            "API_KEY:sk-1",
            "org",
        ] {
            let e = bad.parse::<SubjectId>().unwrap_err();
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn v4_and_mapped_are_the_same_cluster() {
        let a = IpCluster::new("10.1.2.3".parse().unwrap(), 24, 48);
        let b = IpCluster::new("::ffff:10.1.2.99".parse().unwrap(), 24, 48);
        assert_eq!(a, b);
        let c = IpCluster::new("10.1.3.3".parse().unwrap(), 24, 48);
        assert_ne!(a, c);
    }

    #[test]
    fn prefixes_are_configurable_and_clamped() {
        let a = IpCluster::new("10.1.2.3".parse().unwrap(), 16, 48);
        assert_eq!(a.to_string(), "10.1.0.0/16");
        let b = IpCluster::new("10.1.2.3".parse().unwrap(), 40, 48);
        assert_eq!(b.to_string(), "10.1.2.3/32");
        let z = IpCluster::new("10.1.2.3".parse().unwrap(), 0, 48);
        assert_eq!(z.to_string(), "0.0.0.0/0");
        let v6 = IpCluster::new("2001:db8:1:2:3::1".parse().unwrap(), 24, 64);
        assert_eq!(v6.to_string(), "2001:db8:1:2::/64");
        // A v4 /0 and a v6 ::/0 stay distinct.
        let z6 = IpCluster::new("::1".parse().unwrap(), 24, 0);
        assert_ne!(z.bits(), z6.bits());
    }

    #[test]
    fn cidr_round_trip() {
        let c = IpCluster::new("198.51.100.23".parse().unwrap(), 24, 48);
        assert_eq!(parse_cidr(&c.to_string()), Some(c));
        let c6 = IpCluster::new("2001:db8:abcd:1::9".parse().unwrap(), 24, 48);
        assert_eq!(parse_cidr(&c6.to_string()), Some(c6));
        assert_eq!(parse_cidr("1.2.3.4/33"), None);
        assert_eq!(parse_cidr("nonsense"), None);
    }
}
