//! Feature `tower`: a [`Layer`] and [`Service`] that check every HTTP request against a shared
//! [`Warden`], answer denials without calling the inner service, put the rate-limit headers on
//! every response and settle the permit when the response body ends.
//!
//! Depends only on `tower-layer`, `tower-service`, `http`, `http-body` and `pin-project-lite`,
//! and is generic over request and response bodies.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::behavior::Level;
use crate::decision::{Decision, Denial, OwnedPermit};
use crate::request::Request;
use crate::subject::IpCluster;
use crate::warden::Warden;

/// The problem type of a behavioural challenge (draft-ietf-httpapi-ratelimit-headers, §5.3).
const ABNORMAL_USAGE: &str =
    "https://iana.org/assignments/http-problem-types#abnormal-usage-detected";
/// The problem type of a classic limit (draft-ietf-httpapi-ratelimit-headers, §5.1).
const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
const PROBLEM_JSON: &str = "application/problem+json";
/// The default trailer that carries the actual output tokens of a streamed response.
const DEFAULT_USAGE_TRAILER: &str = "x-usage-output-tokens";
/// At most this many trusted hops are walked in a forwarding header.
const MAX_HOPS: usize = 32;

/// The organisation of a request, as a request extension set by the host's auth layer.
///
/// The layer reads it in `call`; when it is absent, the layer's
/// [`org_fallback`](WardenLayer::org_fallback) closure is asked, and otherwise the request
/// has no org subject. An empty id means "no org".
///
/// # Examples
///
/// ```
/// use ratewarden::OrgId;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(OrgId("org-acme".into()));
/// assert_eq!(req.extensions().get::<OrgId>().map(|o| o.0.as_str()), Some("org-acme"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OrgId(pub String);

/// The address of the connection's peer, as a request extension.
///
/// By default the layer reads the client address from a `PeerAddr` extension, then from a
/// plain [`SocketAddr`] extension. axum stores the peer as `ConnectInfo<SocketAddr>`, a type
/// this crate cannot name without depending on axum; read it with
/// [`WardenLayer::peer_addr`]:
///
/// ```
/// use axum::extract::ConnectInfo;
/// use std::net::SocketAddr;
/// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
/// let layer = ratewarden::WardenLayer::new(warden).peer_addr(|parts| {
///     parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
/// });
/// # let _ = layer;
/// ```
///
/// # Examples
///
/// ```
/// use ratewarden::PeerAddr;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(PeerAddr("192.0.2.1:40000".parse().unwrap()));
/// # let _ = req;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// Prompt features and expected cost of a request, as a request extension the host fills in
/// (for example in a `map_request` that runs before the layer).
///
/// Without it, a request costs one request, no input tokens and the layer's
/// [`default_expected_output_tokens`](WardenLayer::default_expected_output_tokens).
///
/// # Examples
///
/// ```
/// use ratewarden::PromptFeatures;
/// let mut f = PromptFeatures::default();
/// f.input_tokens = 412;
/// f.expected_output_tokens = 800;
/// f.prompt_fp = Some(0x9f86_d081_884c_7d65);
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(f);
/// # let _ = req;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PromptFeatures {
    /// Exact 64-bit hash of the prompt.
    pub prompt_fp: Option<u64>,
    /// 64-bit SimHash of the prompt.
    pub prompt_simhash: Option<u64>,
    /// 64-bit hash of the prompt's template or system prompt.
    pub template_fp: Option<u64>,
    /// Whether token log-probabilities were requested.
    pub logprobs: bool,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Output tokens charged up front, settled to the actual number when the body ends.
    pub expected_output_tokens: u64,
}

/// The actual usage of a response, as a response extension the inner service sets.
///
/// The layer settles the request's permit with it when the response body ends (or is
/// dropped). A usage trailer (see [`WardenLayer::usage_trailer`]) that arrives at the end of
/// the stream takes precedence over this extension.
///
/// # Examples
///
/// ```
/// use ratewarden::Usage;
/// let mut res = http::Response::new(String::from("..."));
/// res.extensions_mut().insert(Usage::new(640));
/// assert_eq!(res.extensions().get::<Usage>().unwrap().output_tokens, 640);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Usage {
    /// Output tokens actually produced.
    pub output_tokens: u64,
}

impl Usage {
    /// A usage of `output_tokens` output tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(ratewarden::Usage::new(3).output_tokens, 3);
    /// ```
    pub const fn new(output_tokens: u64) -> Self {
        Self { output_tokens }
    }
}

/// A trusted proxy given to [`WardenLayer::trusted_proxies`] that is not an address or a
/// CIDR block.
///
/// # Examples
///
/// ```
/// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
/// let err = ratewarden::WardenLayer::new(warden).trusted_proxies(["10.0.0.0/33"]).unwrap_err();
/// assert_eq!(err.to_string(), "invalid trusted proxy `10.0.0.0/33`: expected an address or a cidr block such as 10.0.0.0/8 or fd00::/8");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidCidr {
    /// The rejected text.
    pub input: String,
}

impl fmt::Display for InvalidCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid trusted proxy `{}`: expected an address or a cidr block such as 10.0.0.0/8 or fd00::/8",
            self.input
        )
    }
}

impl std::error::Error for InvalidCidr {}

type PeerFn = dyn Fn(&Parts) -> Option<IpAddr> + Send + Sync;
type OrgFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// How a request is turned into a [`Request`]; shared by every clone of the service.
#[derive(Clone)]
struct Config {
    bearer: bool,
    key_header: Option<HeaderName>,
    org_fallback: Option<Arc<OrgFn>>,
    peer: Option<Arc<PeerFn>>,
    trusted: Vec<IpCluster>,
    forwarded: HeaderName,
    usage_trailer: Option<HeaderName>,
    default_expected_output: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bearer: true,
            key_header: None,
            org_fallback: None,
            peer: None,
            trusted: Vec::new(),
            forwarded: HeaderName::from_static("x-forwarded-for"),
            usage_trailer: Some(HeaderName::from_static(DEFAULT_USAGE_TRAILER)),
            default_expected_output: 0,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bearer", &self.bearer)
            .field("key_header", &self.key_header)
            .field("org_fallback", &self.org_fallback.as_ref().map(|_| ".."))
            .field("peer", &self.peer.as_ref().map(|_| ".."))
            .field("trusted", &self.trusted)
            .field("forwarded", &self.forwarded)
            .field("usage_trailer", &self.usage_trailer)
            .field("default_expected_output", &self.default_expected_output)
            .finish()
    }
}

impl Config {
    /// The API key: the named header if configured and present, else `Authorization: Bearer`.
    /// Values that are not visible ASCII, or empty, count as absent.
    fn api_key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        if let Some(name) = &self.key_header {
            let v = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim);
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                return Some(v);
            }
        }
        if !self.bearer {
            return None;
        }
        let v = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, token) = v.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }

    fn peer(&self, parts: &Parts) -> Option<IpAddr> {
        match &self.peer {
            Some(f) => f(parts),
            None => parts
                .extensions
                .get::<PeerAddr>()
                .map(|p| p.0.ip())
                .or_else(|| parts.extensions.get::<SocketAddr>().map(SocketAddr::ip)),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted
            .iter()
            .any(|c| IpCluster::new(ip, c.prefix(), c.prefix()) == *c)
    }

    /// The client address; see [`WardenLayer::trusted_proxies`] for the rule.
    fn client_ip(&self, parts: &Parts) -> IpAddr {
        let peer = self
            .peer(parts)
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return peer;
        }
        // Invariant at the top of each step: `client` is a trusted hop.
        let mut client = peer;
        let mut walked = 0;
        for line in parts.headers.get_all(&self.forwarded).iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for hop in line.rsplit(',') {
                walked += 1;
                if walked > MAX_HOPS {
                    return client;
                }
                match parse_hop(hop) {
                    Some(ip) => client = ip,
                    None => return client,
                }
                if !self.is_trusted(client) {
                    return client;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `ip`, `ipv4:port` or `[ipv6]:port`, with optional spaces.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim_matches(|c| c == ' ' || c == '\t');
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        if !tail.is_empty() {
            tail.strip_prefix(':')?.parse::<u16>().ok()?;
        }
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = hop.split_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// `a.b.c.d/len`, `v6::/len`, or a bare address (a /32 or /128 block).
fn parse_trusted(s: &str) -> Option<IpCluster> {
    let s = s.trim();
    if s.contains('/') {
        return crate::subject::parse_cidr(s);
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| IpCluster::new(ip, 32, 128))
}

/// A [`Layer`] that puts a shared [`Warden`] in front of an HTTP service.
///
/// Every request is decided in [`Service::call`] (never in `poll_ready`), against one
/// `Arc<Warden>` shared by every clone of the service, so per-connection clones share one
/// limit.
///
/// **Denials** never reach the inner service:
///
/// | denial | status | body |
/// |---|---|---|
/// | a classic limit | 429 with `Retry-After` (whole seconds, rounded up) and the rate-limit headers | `application/problem+json`, type `…#quota-exceeded` |
/// | behavioural `challenge` | 429 | `application/problem+json`, type `…#abnormal-usage-detected` |
/// | behavioural `block` | 403 | `application/problem+json`, type `about:blank` |
///
/// The problem types are those registered by draft-ietf-httpapi-ratelimit-headers (§5 and
/// §10.2; RFC 9457 problem details): `type`, `title` (the registered title), `status`, a
/// short `detail`, and the draft's `violated-policies` member, which names the refusing
/// limit as it appears in the `RateLimit` header (`["requests_per_minute"]`) or the level
/// (`["challenge"]`). A block says only "Forbidden" (`about:blank`), so as not to tell an
/// abuser what was detected.
///
/// **Allowed** responses carry the rate-limit headers ([`Permit::headers`](crate::Permit::headers)),
/// replacing any of the same name from the inner service. The permit lives in the response
/// body ([`WardenBody`]): a concurrency slot is held until the body ends or is dropped, and
/// the token estimate is settled to the actual output then (see [`Usage`] and
/// [`usage_trailer`](WardenLayer::usage_trailer)). When no usage is reported, the estimate
/// stays charged.
///
/// **Extraction** (all configurable):
/// - API key: `Authorization: Bearer <key>` (scheme case-insensitive), or a named header
///   ([`api_key_header`](WardenLayer::api_key_header)). A request without one is checked as
///   [`Request::anonymous`]: charged to the anonymous bucket of its IP cluster, never a free
///   pass.
/// - Org: the [`OrgId`] extension, else [`org_fallback`](WardenLayer::org_fallback).
/// - Client IP: the peer address ([`PeerAddr`], [`SocketAddr`] or
///   [`peer_addr`](WardenLayer::peer_addr)); forwarding headers only from
///   [`trusted_proxies`](WardenLayer::trusted_proxies). A request with no peer address
///   is charged to `0.0.0.0`, one cluster for all such requests: configure the peer.
/// - Cost and prompt features: the [`PromptFeatures`] extension.
///
/// Header values that are not visible ASCII, or do not parse, count as absent.
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
/// use ratewarden::{ManualClock, Policy, Usage, Warden, WardenLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let warden = Arc::new(Warden::builder().policy(Policy::llm_api()).clock(ManualClock::new()).build()?);
/// let layer = WardenLayer::new(warden)
///     .api_key_header(http::HeaderName::from_static("x-api-key"))
///     .trusted_proxies(["10.0.0.0/8"])?;
/// let svc = layer.layer(service_fn(|_req: http::Request<String>| async {
///     let mut res = http::Response::new(String::from("hello"));
///     res.extensions_mut().insert(Usage::new(5));
///     Ok::<_, Infallible>(res)
/// }));
///
/// let req = http::Request::builder()
///     .header("authorization", "Bearer sk-123")
///     .extension(ratewarden::PeerAddr("192.0.2.1:5000".parse()?))
///     .body(String::new())?;
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// let res = rt.block_on(svc.oneshot(req))?;
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "19");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct WardenLayer {
    warden: Arc<Warden>,
    config: Arc<Config>,
}

impl WardenLayer {
    /// A layer that checks requests against `warden`, with the default extraction: API key
    /// from `Authorization: Bearer`, org from [`OrgId`], peer from [`PeerAddr`] or
    /// [`SocketAddr`], no trusted proxies, usage trailer `x-usage-output-tokens`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// let warden = Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden.clone());
    /// assert!(Arc::ptr_eq(layer.warden(), &warden));
    /// ```
    pub fn new(warden: Arc<Warden>) -> Self {
        Self {
            warden,
            config: Arc::new(Config::default()),
        }
    }

    /// The shared warden.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden);
    /// assert_eq!(layer.warden().stats().allowed, 0);
    /// ```
    pub fn warden(&self) -> &Arc<Warden> {
        &self.warden
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Reads the API key from the header `name` (for example `x-api-key`) before
    /// `Authorization: Bearer`.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden)
    ///     .api_key_header(http::HeaderName::from_static("x-api-key"));
    /// # let _ = layer;
    /// ```
    pub fn api_key_header(mut self, name: HeaderName) -> Self {
        self.config().key_header = Some(name);
        self
    }

    /// Whether `Authorization: Bearer <key>` is read (default `true`).
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden)
    ///     .api_key_header(http::HeaderName::from_static("x-api-key"))
    ///     .bearer_auth(false);
    /// # let _ = layer;
    /// ```
    pub fn bearer_auth(mut self, on: bool) -> Self {
        self.config().bearer = on;
        self
    }

    /// The org of a request that has no [`OrgId`] extension.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden).org_fallback(|parts| {
    ///     parts.headers.get("x-org").and_then(|v| v.to_str().ok()).map(String::from)
    /// });
    /// # let _ = layer;
    /// ```
    pub fn org_fallback<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config().org_fallback = Some(Arc::new(f));
        self
    }

    /// How to read the peer address of a request (replaces the default, which reads
    /// [`PeerAddr`] then [`SocketAddr`] extensions).
    ///
    /// # Examples
    ///
    /// With axum, read its `ConnectInfo` (serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`):
    ///
    /// ```
    /// use axum::extract::ConnectInfo;
    /// use std::net::SocketAddr;
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden).peer_addr(|parts| {
    ///     parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
    /// });
    /// # let _ = layer;
    /// ```
    ///
    /// Any other source:
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden)
    ///     .peer_addr(|parts| parts.extensions.get::<std::net::IpAddr>().copied());
    /// # let _ = layer;
    /// ```
    pub fn peer_addr<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<IpAddr> + Send + Sync + 'static,
    {
        self.config().peer = Some(Arc::new(f));
        self
    }

    /// The proxies whose forwarding header is believed: addresses or CIDR blocks
    /// (`10.0.0.0/8`, `fd00::/8`, `192.0.2.10`). Adds to any set before.
    ///
    /// The rule: the forwarding header (`X-Forwarded-For`, see
    /// [`forwarded_header`](WardenLayer::forwarded_header)) is read only when the peer is
    /// trusted. It is walked from right to left, starting at the peer: while the current hop
    /// is trusted, the next entry to the left becomes the current hop. The client is the
    /// first hop that is not trusted. So:
    /// - an untrusted peer is the client, whatever the header says (a spoofed header is
    ///   ignored);
    /// - entries left of the first untrusted hop are never read, so a client cannot choose
    ///   its address by prepending entries;
    /// - if every hop is trusted, the client is the leftmost entry, reached by the walk;
    /// - a malformed entry (not `ip`, `ipv4:port` or `[ipv6]:port`; `unknown`; a value that is
    ///   not visible ASCII) stops the walk, and the client is the last trusted hop, the
    ///   proxy that sent it; so is a walk that passes 32 trusted hops.
    ///
    /// Several header lines are read as one list, in order. IPv4-mapped IPv6 addresses match
    /// IPv4 blocks.
    ///
    /// # Errors
    ///
    /// [`InvalidCidr`] for the first entry that is not an address or a CIDR block.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden).trusted_proxies(["10.0.0.0/8", "::1"])?;
    /// # Ok::<(), ratewarden::InvalidCidr>(())
    /// ```
    pub fn trusted_proxies<I>(mut self, cidrs: I) -> Result<Self, InvalidCidr>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for c in cidrs {
            let c = c.as_ref();
            parsed.push(parse_trusted(c).ok_or_else(|| InvalidCidr { input: c.into() })?);
        }
        self.config().trusted.extend(parsed);
        Ok(self)
    }

    /// The forwarding header read from trusted proxies (default `x-forwarded-for`). It must
    /// hold a comma-separated list of addresses, client first.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden)
    ///     .forwarded_header(http::HeaderName::from_static("x-original-forwarded-for"));
    /// # let _ = layer;
    /// ```
    pub fn forwarded_header(mut self, name: HeaderName) -> Self {
        self.config().forwarded = name;
        self
    }

    /// The response trailer that carries the actual output tokens of a streamed response
    /// (default `x-usage-output-tokens`); `None` ignores trailers. A trailer value that is
    /// not a non-negative integer counts as absent. The trailer is passed on unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden)
    ///     .usage_trailer(Some(http::HeaderName::from_static("x-output-tokens")));
    /// # let _ = layer;
    /// ```
    pub fn usage_trailer(mut self, name: Option<HeaderName>) -> Self {
        self.config().usage_trailer = name;
        self
    }

    /// The output tokens charged up front for a request without a [`PromptFeatures`]
    /// extension (default 0: token limits are then charged only at settlement).
    ///
    /// # Examples
    ///
    /// ```
    /// # let warden = std::sync::Arc::new(ratewarden::Warden::builder().build().unwrap());
    /// let layer = ratewarden::WardenLayer::new(warden).default_expected_output_tokens(256);
    /// # let _ = layer;
    /// ```
    pub fn default_expected_output_tokens(mut self, n: u64) -> Self {
        self.config().default_expected_output = n;
        self
    }
}

impl<S> Layer<S> for WardenLayer {
    type Service = WardenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WardenService {
            inner,
            warden: Arc::clone(&self.warden),
            config: Arc::clone(&self.config),
        }
    }
}

/// The service made by [`WardenLayer`]; see there for what it does.
///
/// Cloning it is cheap (two `Arc` clones and the inner service's clone); every clone
/// shares the warden.
#[derive(Clone, Debug)]
pub struct WardenService<S> {
    inner: S,
    warden: Arc<Warden>,
    config: Arc<Config>,
}

/// A decision detached from the borrow of the warden.
enum Verdict {
    Allow(OwnedPermit),
    Deny(Denial),
}

impl<S> WardenService<S> {
    /// Decides one request.
    fn decide(&self, parts: &Parts) -> Verdict {
        let cfg = &*self.config;
        let ip = cfg.client_ip(parts);
        let key = cfg.api_key(&parts.headers);
        let fallback;
        let org = match parts.extensions.get::<OrgId>() {
            Some(o) => Some(o.0.as_str()),
            None => match &cfg.org_fallback {
                Some(f) => {
                    fallback = f(parts);
                    fallback.as_deref()
                }
                None => None,
            },
        };
        let mut req = match key {
            Some(k) => Request::new(k, "", ip),
            None => Request::anonymous(ip),
        };
        // Also for an anonymous request: an org set by the host's auth layer is charged.
        req.org = org.filter(|o| !o.is_empty());
        req = match parts.extensions.get::<PromptFeatures>() {
            Some(f) => {
                let mut r = req
                    .input_tokens(f.input_tokens)
                    .expected_output_tokens(f.expected_output_tokens)
                    .logprobs(f.logprobs);
                r.prompt_fp = f.prompt_fp;
                r.prompt_simhash = f.prompt_simhash;
                r.template_fp = f.template_fp;
                r
            }
            None => req.expected_output_tokens(cfg.default_expected_output),
        };
        match self.warden.check(&req) {
            Decision::Allow(p) => Verdict::Allow(p.into_owned(Arc::clone(&self.warden))),
            Decision::Deny(d) => Verdict::Deny(d),
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for WardenService<S>
where
    S: Service<http::Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    ResBody::Data: From<String>,
{
    type Response = Response<WardenBody<ResBody>>;
    type Error = S::Error;
    type Future = WardenFuture<S::Future>;

    /// The inner service's readiness. No decision is made here.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        match self.decide(&parts) {
            Verdict::Allow(permit) => WardenFuture {
                state: State::Allowed {
                    fut: self.inner.call(http::Request::from_parts(parts, body)),
                    permit: Some(permit),
                    trailer: self.config.usage_trailer.clone(),
                },
            },
            Verdict::Deny(denial) => WardenFuture {
                state: State::Denied {
                    res: Some(denial_response(&denial)),
                },
            },
        }
    }
}

/// Escapes `s` as the contents of a JSON string.
fn json_escape(out: &mut String, s: &str) {
    use fmt::Write;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

fn problem(type_uri: &str, title: &str, status: StatusCode, detail: &str, policy: &str) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("{\"type\":\"");
    s.push_str(type_uri);
    s.push_str("\",\"title\":\"");
    s.push_str(title);
    s.push_str("\",\"status\":");
    s.push_str(status.as_str());
    if !detail.is_empty() {
        s.push_str(",\"detail\":\"");
        json_escape(&mut s, detail);
        s.push('"');
    }
    if !policy.is_empty() {
        s.push_str(",\"violated-policies\":[\"");
        json_escape(&mut s, policy);
        s.push_str("\"]");
    }
    s.push('}');
    s
}

/// A header name for the crate's own names: the known ones are built at compile time; any
/// other is parsed (and skipped if invalid).
fn header_name(name: &'static str) -> Option<HeaderName> {
    macro_rules! known {
        ($($n:literal),*) => {
            match name {
                $($n => return Some(const { HeaderName::from_static($n) }),)*
                _ => {}
            }
        };
    }
    known!(
        "ratelimit-policy",
        "ratelimit",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "retry-after"
    );
    HeaderName::from_bytes(name.as_bytes()).ok()
}

/// A sink for `visit_headers` that inserts each header into `map` (room for all of them is
/// reserved first; each value is copied once, into its `HeaderValue`).
fn put_headers(map: &mut HeaderMap) -> impl FnMut(&'static str, &str) + '_ {
    map.reserve(9);
    move |name, value| {
        if let (Some(n), Ok(v)) = (header_name(name), HeaderValue::from_str(value)) {
            map.insert(n, v);
        }
    }
}

/// The response for a denial: status, headers and a problem body.
fn denial_response(d: &Denial) -> Response<String> {
    let (status, body) = match d.behavior() {
        Some(Level::Block) => (
            StatusCode::FORBIDDEN,
            problem("about:blank", "Forbidden", StatusCode::FORBIDDEN, "", ""),
        ),
        Some(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            problem(
                ABNORMAL_USAGE,
                "Abnormal Usage Detected",
                StatusCode::TOO_MANY_REQUESTS,
                "request pattern flagged as abnormal; re-verify to continue",
                d.limit(),
            ),
        ),
        None => (
            StatusCode::TOO_MANY_REQUESTS,
            problem(
                QUOTA_EXCEEDED,
                "Quota Exceeded",
                StatusCode::TOO_MANY_REQUESTS,
                d.reason(),
                d.limit(),
            ),
        ),
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    d.visit_headers(&mut String::with_capacity(96), &mut put_headers(h));
    res
}

pin_project! {
    /// The response future of [`WardenService`]: a ready denial, or the inner service's
    /// future with the permit waiting to be put in the response body.
    ///
    /// If it is dropped before completion, the permit is dropped with it (concurrency slots
    /// released, the estimate stays charged).
    #[derive(Debug)]
    pub struct WardenFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Allowed {
            #[pin]
            fut: F,
            permit: Option<OwnedPermit>,
            trailer: Option<HeaderName>,
        },
        Denied {
            res: Option<Response<String>>,
        },
    }
}

impl<F, B, E> Future for WardenFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<WardenBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Allowed {
                fut,
                permit,
                trailer,
            } => {
                let res = match ready!(fut.poll(cx)) {
                    Ok(res) => res,
                    Err(e) => {
                        drop(permit.take());
                        return Poll::Ready(Err(e));
                    }
                };
                let (mut parts, body) = res.into_parts();
                let permit = permit.take();
                if let Some(p) = &permit {
                    p.visit_headers(
                        &mut String::with_capacity(96),
                        &mut put_headers(&mut parts.headers),
                    );
                }
                let usage = parts.extensions.get::<Usage>().map(|u| u.output_tokens);
                let body = WardenBody {
                    kind: Kind::Inner {
                        body,
                        settle: Settle {
                            permit,
                            usage,
                            trailer: trailer.take(),
                        },
                    },
                };
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            StateProj::Denied { res } => {
                // Polled again after completion: answer 500 rather than panic.
                let res = res.take().unwrap_or_else(|| {
                    let mut r = Response::new(String::new());
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                });
                Poll::Ready(Ok(res.map(|s| WardenBody {
                    kind: Kind::Full { data: Some(s) },
                })))
            }
        }
    }
}

/// Settles or drops the permit once: at the end of the body, on a body error, or on drop.
#[derive(Debug)]
struct Settle {
    permit: Option<OwnedPermit>,
    usage: Option<u64>,
    trailer: Option<HeaderName>,
}

impl Settle {
    fn finish(&mut self) {
        if let Some(p) = self.permit.take() {
            match self.usage {
                Some(n) => p.settle(n),
                None => drop(p),
            }
        }
    }

    fn observe(&mut self, trailers: &HeaderMap) {
        let Some(name) = &self.trailer else { return };
        let n = trailers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = n {
            self.usage = Some(n);
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.finish();
    }
}

pin_project! {
    /// The response body of [`WardenService`]: the inner service's body, which holds the
    /// request's permit, or the small body of a denial.
    ///
    /// The permit is settled when the inner body ends (`poll_frame` returns `None`), fails,
    /// or is dropped: with the usage trailer if one arrived, else with the [`Usage`]
    /// extension of the response, else it is dropped and the estimate stays charged. Its
    /// concurrency slots are held until then.
    ///
    /// # Examples
    ///
    /// ```
    /// use http_body::Body;
    /// let body = ratewarden::WardenBody::new(String::from("hi"));
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    #[derive(Debug)]
    pub struct WardenBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            settle: Settle,
        },
        Full {
            data: Option<String>,
        },
    }
}

impl<B> WardenBody<B> {
    /// Wraps `body` with no permit, for hosts that answer with the same body type from
    /// elsewhere in their stack.
    ///
    /// # Examples
    ///
    /// ```
    /// let body = ratewarden::WardenBody::new(String::new());
    /// # let _ = body;
    /// ```
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                settle: Settle {
                    permit: None,
                    usage: None,
                    trailer: None,
                },
            },
        }
    }
}

impl<B> Body for WardenBody<B>
where
    B: Body,
    B::Data: From<String>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body, settle } => {
                let out = ready!(body.poll_frame(cx));
                match &out {
                    Some(Ok(frame)) => {
                        if let Some(t) = frame.trailers_ref() {
                            settle.observe(t);
                        }
                    }
                    Some(Err(_)) | None => settle.finish(),
                }
                Poll::Ready(out)
            }
            KindProj::Full { data } => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(B::Data::from(d)))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Full { data } => data.as_ref().map_or(true, String::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{InlineStr, RateLimitInfo};
    use crate::subject::SubjectKind;

    fn parts(peer: &str, xff: &[&str]) -> Parts {
        let mut b = http::Request::builder();
        for x in xff {
            b = b.header("x-forwarded-for", *x);
        }
        let (mut p, ()) = b.body(()).unwrap().into_parts();
        p.extensions
            .insert(PeerAddr(SocketAddr::new(peer.parse().unwrap(), 1234)));
        p
    }

    fn cfg(trusted: &[&str]) -> Config {
        Config {
            trusted: trusted.iter().map(|t| parse_trusted(t).unwrap()).collect(),
            ..Config::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hops_parse() {
        assert_eq!(parse_hop(" 192.0.2.1 "), Some(ip("192.0.2.1")));
        assert_eq!(parse_hop("192.0.2.1:8080"), Some(ip("192.0.2.1")));
        assert_eq!(parse_hop("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop("[2001:db8::1]"), Some(ip("2001:db8::1")));
        for bad in [
            "unknown",
            "",
            "1.2.3",
            "[::1]x",
            "1.2.3.4:99999",
            "fe80::1%eth0",
            "_hidden",
        ] {
            assert_eq!(parse_hop(bad), None, "{bad}");
        }
    }

    #[test]
    fn trusted_parse() {
        assert!(parse_trusted("10.0.0.0/8").is_some());
        assert!(parse_trusted("192.0.2.7").is_some());
        assert!(parse_trusted("fd00::/8").is_some());
        assert!(parse_trusted("10.0.0.0/33").is_none());
        assert!(parse_trusted("ten").is_none());
    }

    #[test]
    fn forwarding_rule() {
        let c = cfg(&["10.0.0.0/8"]);
        // Untrusted peer: the header is ignored.
        assert_eq!(
            c.client_ip(&parts("203.0.113.5", &["198.51.100.1"])),
            ip("203.0.113.5")
        );
        // Trusted peer: the rightmost untrusted hop; a prepended spoof is never read.
        let p = parts("10.0.0.1", &["1.1.1.1, 198.51.100.7, 10.0.0.2"]);
        assert_eq!(c.client_ip(&p), ip("198.51.100.7"));
        // Several lines are one list.
        let p = parts("10.0.0.1", &["1.1.1.1, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(c.client_ip(&p), ip("198.51.100.7"));
        // All trusted: the leftmost.
        assert_eq!(
            c.client_ip(&parts("10.0.0.1", &["10.9.9.9, 10.0.0.2"])),
            ip("10.9.9.9")
        );
        // Malformed: the last trusted hop.
        assert_eq!(
            c.client_ip(&parts("10.0.0.1", &["198.51.100.7, junk, 10.0.0.2"])),
            ip("10.0.0.2")
        );
        assert_eq!(c.client_ip(&parts("10.0.0.1", &["junk"])), ip("10.0.0.1"));
        // No header: the peer.
        assert_eq!(c.client_ip(&parts("10.0.0.1", &[])), ip("10.0.0.1"));
        // Mapped v4 peers match v4 blocks.
        assert_eq!(
            c.client_ip(&parts("::ffff:10.0.0.1", &["198.51.100.7"])),
            ip("198.51.100.7")
        );
        // Too many trusted hops: stop at the last one walked.
        let many = vec!["10.0.0.3"; 40].join(",");
        assert_eq!(
            c.client_ip(&parts("10.0.0.1", &[&format!("198.51.100.7,{many}")])),
            ip("10.0.0.3")
        );
        // No trusted proxies at all.
        assert_eq!(
            cfg(&[]).client_ip(&parts("10.0.0.1", &["198.51.100.7"])),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn non_ascii_forwarding_line_stops_the_walk() {
        let c = cfg(&["10.0.0.0/8"]);
        let mut p = parts("10.0.0.1", &["198.51.100.7"]);
        p.headers
            .append("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(c.client_ip(&p), ip("10.0.0.1"));
    }

    #[test]
    fn no_peer_is_unspecified() {
        let (p, ()) = http::Request::new(()).into_parts();
        assert_eq!(
            Config::default().client_ip(&p),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn api_keys() {
        let mut c = Config::default();
        let h = |pairs: &[(&str, &[u8])]| {
            let mut m = HeaderMap::new();
            for (n, v) in pairs {
                m.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            m
        };
        assert_eq!(
            c.api_key(&h(&[("authorization", b"Bearer sk-1")])),
            Some("sk-1")
        );
        assert_eq!(
            c.api_key(&h(&[("authorization", b"bearer  sk-1 ")])),
            Some("sk-1")
        );
        assert_eq!(c.api_key(&h(&[("authorization", b"Basic abc")])), None);
        assert_eq!(c.api_key(&h(&[("authorization", b"Bearer ")])), None);
        assert_eq!(c.api_key(&h(&[("authorization", b"Bearer \xffx")])), None);
        c.key_header = Some(HeaderName::from_static("x-api-key"));
        assert_eq!(
            c.api_key(&h(&[("x-api-key", b"k2"), ("authorization", b"Bearer k1")])),
            Some("k2")
        );
        assert_eq!(
            c.api_key(&h(&[("x-api-key", b""), ("authorization", b"Bearer k1")])),
            Some("k1")
        );
        c.bearer = false;
        assert_eq!(c.api_key(&h(&[("authorization", b"Bearer k1")])), None);
    }

    fn denial(behavior: Option<Level>) -> Denial {
        Denial {
            kind: SubjectKind::ApiKey,
            reason: match behavior {
                Some(l) => InlineStr::new(&["behavior:", l.as_str()]),
                None => InlineStr::new(&["api_key:requests_per_minute"]),
            },
            behavior,
            retry_after: behavior
                .is_none()
                .then(|| std::time::Duration::from_millis(1500)),
            level: behavior.unwrap_or(Level::Normal),
            info: RateLimitInfo::default(),
        }
    }

    #[test]
    fn denial_responses() {
        let r = denial_response(&denial(None));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["content-type"], PROBLEM_JSON);
        assert_eq!(
            r.body(),
            "{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\"title\":\"Quota Exceeded\",\"status\":429,\"detail\":\"api_key:requests_per_minute\",\"violated-policies\":[\"requests_per_minute\"]}"
        );
        let r = denial_response(&denial(Some(Level::Challenge)));
        assert_eq!(r.status(), 429);
        assert!(r.headers().get("retry-after").is_none());
        assert_eq!(
            r.body(),
            "{\"type\":\"https://iana.org/assignments/http-problem-types#abnormal-usage-detected\",\"title\":\"Abnormal Usage Detected\",\"status\":429,\"detail\":\"request pattern flagged as abnormal; re-verify to continue\",\"violated-policies\":[\"challenge\"]}"
        );
        let r = denial_response(&denial(Some(Level::Block)));
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.body(),
            "{\"type\":\"about:blank\",\"title\":\"Forbidden\",\"status\":403}"
        );
    }

    #[test]
    fn json_escapes() {
        let mut s = String::new();
        json_escape(&mut s, "a\"b\\c\n");
        assert_eq!(s, "a\\\"b\\\\c\\u000a");
    }

    #[test]
    fn header_names() {
        assert_eq!(header_name("ratelimit").unwrap().as_str(), "ratelimit");
        assert_eq!(header_name("Retry-After").unwrap().as_str(), "retry-after");
        assert!(header_name("bad name").is_none());
    }
}
