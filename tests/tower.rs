//! The tower layer through its public API: `ServiceExt::oneshot`, a manual clock, exact
//! assertions.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use ratewarden::{
    Level, LimitConfig, ManualClock, OrgId, PeerAddr, Period, Policy, PromptFeatures, SubjectId,
    Usage, Warden, WardenBody, WardenLayer,
};
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Harness

/// A response body that yields scripted frames, each ready at once.
struct Script {
    frames: VecDeque<Frame<Bytes>>,
}

impl Body for Script {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

type Inner = BoxCloneService<Request<String>, Response<Script>, Infallible>;
type Svc = ratewarden::WardenService<Inner>;

/// The inner "model": answers `x-chunks` data chunks (default 1), a `Usage` extension from
/// `x-usage`, and a usage trailer from `x-trailer`. Counts its calls.
fn model(calls: Arc<AtomicUsize>) -> Inner {
    BoxCloneService::new(service_fn(move |req: Request<String>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let num = |name: &str| -> Option<u64> {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        let mut frames: VecDeque<Frame<Bytes>> = (0..num("x-chunks").unwrap_or(1))
            .map(|i| Frame::data(Bytes::from(format!("chunk {i}\n"))))
            .collect();
        if let Some(t) = num("x-trailer") {
            let mut h = HeaderMap::new();
            h.insert("x-usage-output-tokens", HeaderValue::from(t));
            frames.push_back(Frame::trailers(h));
        }
        let mut res = Response::new(Script { frames });
        if let Some(u) = num("x-usage") {
            res.extensions_mut().insert(Usage::new(u));
        }
        async move { Ok(res) }
    }))
}

struct Harness {
    warden: Arc<Warden>,
    clock: ManualClock,
    calls: Arc<AtomicUsize>,
    svc: Svc,
}

fn harness(policy: Policy, configure: impl FnOnce(WardenLayer) -> WardenLayer) -> Harness {
    let clock = ManualClock::new();
    let warden = Arc::new(
        Warden::builder()
            .policy(policy)
            .clock(clock.clone())
            .build()
            .unwrap(),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = configure(WardenLayer::new(warden.clone()));
    Harness {
        svc: layer.layer(model(calls.clone())),
        warden,
        clock,
        calls,
    }
}

impl Harness {
    async fn send(&self, req: Request<String>) -> Response<WardenBody<Script>> {
        self.svc.clone().oneshot(req).await.unwrap()
    }
}

fn minute() -> Period {
    Period(Duration::from_secs(60))
}

fn gcra(rate: u64, burst: u64) -> LimitConfig {
    LimitConfig::Gcra {
        rate,
        period: minute(),
        burst,
    }
}

fn tokens(n: u64) -> LimitConfig {
    LimitConfig::Tokens {
        tokens: n,
        period: minute(),
        burst: None,
    }
}

fn limits(pairs: &[(&str, LimitConfig)]) -> BTreeMap<String, LimitConfig> {
    pairs
        .iter()
        .map(|(n, l)| ((*n).to_string(), l.clone()))
        .collect()
}

/// No limits, behaviour off.
fn bare() -> Policy {
    let mut p = Policy::empty();
    p.behavior.enabled = false;
    p
}

/// A request from `peer` with the api key `key` (none if empty).
fn req(key: &str, peer: &str) -> http::request::Builder {
    let mut b = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .extension(PeerAddr(format!("{peer}:40000").parse().unwrap()));
    if !key.is_empty() {
        b = b.header("authorization", format!("Bearer {key}"));
    }
    b
}

fn get(b: http::request::Builder) -> Request<String> {
    b.body(String::new()).unwrap()
}

fn header<B>(res: &Response<B>, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn int<B>(res: &Response<B>, name: &str) -> u64 {
    header(res, name)
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

async fn text(res: Response<WardenBody<Script>>) -> String {
    let b = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

/// A token-limited policy for settlement tests: 1000 tokens/min per key, nothing else.
fn token_policy() -> Policy {
    let mut p = bare();
    p.api_key = limits(&[("tokens_per_minute", tokens(1000))]);
    p
}

fn features(input: u64, expected_output: u64) -> PromptFeatures {
    let mut f = PromptFeatures::default();
    f.input_tokens = input;
    f.expected_output_tokens = expected_output;
    f
}

// ---------------------------------------------------------------------------------------------
// Classic limits

#[tokio::test]
async fn allowed_response_carries_rate_limit_headers() {
    let h = harness(Policy::llm_api_limits_only(), |l| l);
    let res = h.send(get(req("sk-1", "192.0.2.1"))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(int(&res, "x-ratelimit-limit-requests"), 20);
    assert_eq!(int(&res, "x-ratelimit-remaining-requests"), 19);
    assert_eq!(int(&res, "x-ratelimit-limit-tokens"), 400_000);
    assert_eq!(int(&res, "x-ratelimit-remaining-tokens"), 400_000);
    assert_eq!(
        header(&res, "ratelimit-policy").unwrap(),
        "\"requests_per_minute\";q=20;qu=\"request\";w=10, \"tokens_per_minute\";q=400000;qu=\"tokens\";w=60"
    );
    assert_eq!(
        header(&res, "ratelimit").unwrap(),
        "\"requests_per_minute\";r=19;t=1, \"tokens_per_minute\";r=400000;t=0"
    );
    assert!(header(&res, "retry-after").is_none());
    assert_eq!(text(res).await, "chunk 0\n");
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after() {
    let h = harness(Policy::llm_api_limits_only(), |l| l);
    for _ in 0..20 {
        assert_eq!(h.send(get(req("sk-1", "192.0.2.1"))).await.status(), 200);
    }
    let res = h.send(get(req("sk-1", "192.0.2.1"))).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // 120/min: one request every 500 ms, rounded up to whole seconds.
    assert_eq!(int(&res, "retry-after"), 1);
    assert_eq!(int(&res, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(
        header(&res, "content-type").unwrap(),
        "application/problem+json"
    );
    assert_eq!(
        text(res).await,
        "{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\
         \"title\":\"Quota Exceeded\",\"status\":429,\"detail\":\"api_key:requests_per_minute\",\
         \"violated-policies\":[\"requests_per_minute\"]}"
    );
    // Another key is not affected; the same key is again after the interval.
    assert_eq!(h.send(get(req("sk-2", "192.0.2.1"))).await.status(), 200);
    h.clock.advance(Duration::from_millis(500));
    assert_eq!(h.send(get(req("sk-1", "192.0.2.1"))).await.status(), 200);
}

#[tokio::test]
async fn retry_after_rounds_up_to_whole_seconds() {
    let mut p = bare();
    p.api_key = limits(&[("per_minute", gcra(1, 1))]);
    let h = harness(p, |l| l);
    assert_eq!(h.send(get(req("k", "192.0.2.1"))).await.status(), 200);
    h.clock.advance(Duration::from_millis(100));
    let res = h.send(get(req("k", "192.0.2.1"))).await;
    assert_eq!(res.status(), 429);
    // 59.9 s left.
    assert_eq!(int(&res, "retry-after"), 60);
}

#[tokio::test]
async fn a_denied_request_never_reaches_the_inner_service() {
    let h = harness(Policy::llm_api_limits_only(), |l| l);
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(h.send(get(req("sk-1", "192.0.2.1"))).await.status());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(h.calls.load(Ordering::SeqCst), 20);
    assert_eq!(h.warden.stats().denied_rate, 5);
}

#[tokio::test]
async fn clones_of_the_service_share_one_limit() {
    let h = harness(Policy::llm_api_limits_only(), |l| l);
    let other = WardenLayer::new(h.warden.clone()).layer(model(h.calls.clone()));
    for _ in 0..10 {
        assert_eq!(h.send(get(req("sk-1", "192.0.2.1"))).await.status(), 200);
        let res = other
            .clone()
            .oneshot(get(req("sk-1", "192.0.2.1")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(h.send(get(req("sk-1", "192.0.2.1"))).await.status(), 429);
}

#[tokio::test]
async fn decision_is_made_in_call_not_poll_ready() {
    let mut p = bare();
    p.api_key = limits(&[("rpm", gcra(1, 1))]);
    let mut h = harness(p, |l| l);
    // Readiness alone charges nothing.
    for _ in 0..3 {
        std::future::poll_fn(|cx| h.svc.poll_ready(cx))
            .await
            .unwrap();
    }
    assert_eq!(h.warden.stats().allowed, 0);
    let res = h.svc.call(get(req("k", "192.0.2.1"))).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(h.warden.stats().allowed, 1);
}

// ---------------------------------------------------------------------------------------------
// Extraction

#[tokio::test]
async fn api_key_from_a_named_header() {
    let mut p = bare();
    p.api_key = limits(&[("rpm", gcra(1, 1))]);
    let h = harness(p, |l| {
        l.api_key_header(http::HeaderName::from_static("x-api-key"))
    });
    let with = |k: &str| get(req("", "192.0.2.1").header("x-api-key", k));
    assert_eq!(h.send(with("k1")).await.status(), 200);
    assert_eq!(h.send(with("k1")).await.status(), 429);
    assert_eq!(h.send(with("k2")).await.status(), 200);
    // Bearer is still read when the named header is absent.
    assert_eq!(h.send(get(req("k3", "192.0.2.1"))).await.status(), 200);
    assert_eq!(h.send(get(req("k3", "192.0.2.1"))).await.status(), 429);
}

#[tokio::test]
async fn no_api_key_is_the_anonymous_bucket_of_the_ip_cluster() {
    let mut p = bare();
    p.api_key = limits(&[("rpm", gcra(100, 100))]);
    p.anonymous = Some(limits(&[("rpm", gcra(2, 2))]));
    let h = harness(p, |l| l);
    assert_eq!(h.send(get(req("", "192.0.2.1"))).await.status(), 200);
    // A bad header value counts as absent: still anonymous, same bucket.
    let bad = req("", "192.0.2.2").header(
        "authorization",
        HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
    );
    assert_eq!(h.send(get(bad)).await.status(), 200);
    let res = h.send(get(req("", "192.0.2.3"))).await;
    assert_eq!(res.status(), 429);
    assert_eq!(int(&res, "x-ratelimit-limit-requests"), 2);
    // Another cluster has its own anonymous bucket; keyed requests are unaffected.
    assert_eq!(h.send(get(req("", "198.51.100.1"))).await.status(), 200);
    assert_eq!(h.send(get(req("k", "192.0.2.1"))).await.status(), 200);
}

#[tokio::test]
async fn org_from_extension_then_fallback() {
    let mut p = bare();
    p.org = limits(&[("rpm", gcra(1, 1))]);
    let h = harness(p, |l| {
        l.org_fallback(|parts| {
            parts
                .headers
                .get("x-org")
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        })
    });
    let ext = |k: &str, org: &str| get(req(k, "192.0.2.1").extension(OrgId(org.into())));
    assert_eq!(h.send(ext("k1", "acme")).await.status(), 200);
    let res = h.send(ext("k2", "acme")).await;
    assert_eq!(res.status(), 429);
    assert!(text(res).await.contains("\"detail\":\"org:rpm\""));
    // The fallback reads a header when there is no extension.
    assert_eq!(
        h.send(get(req("k3", "192.0.2.1").header("x-org", "globex")))
            .await
            .status(),
        200
    );
    assert_eq!(h.send(ext("k4", "globex")).await.status(), 429);
    // The extension wins over the fallback.
    assert_eq!(
        h.send(get(req("k5", "192.0.2.1")
            .header("x-org", "globex")
            .extension(OrgId("initech".into()))))
            .await
            .status(),
        200
    );
    // No org at all: no org subject.
    assert_eq!(h.send(get(req("k6", "192.0.2.1"))).await.status(), 200);
    assert_eq!(h.send(get(req("k7", "192.0.2.1"))).await.status(), 200);
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let mut p = bare();
    p.ip_cluster = limits(&[("rpm", gcra(1, 1))]);
    let h = harness(p, |l| l.trusted_proxies(["10.0.0.0/8"]).unwrap());
    let spoof = |xff: &str| get(req("", "203.0.113.5").header("x-forwarded-for", xff));
    assert_eq!(h.send(spoof("198.51.100.1")).await.status(), 200);
    // A different claimed client, same real peer: same cluster, refused.
    let res = h.send(spoof("192.0.2.99")).await;
    assert_eq!(res.status(), 429);
    assert!(text(res).await.contains("\"detail\":\"ip_cluster:rpm\""));
}

#[tokio::test]
async fn a_trusted_proxy_is_honoured() {
    let mut p = bare();
    p.ip_cluster = limits(&[("rpm", gcra(1, 1))]);
    let h = harness(p, |l| l.trusted_proxies(["10.0.0.0/8"]).unwrap());
    let via = |xff: &str| get(req("", "10.0.0.1").header("x-forwarded-for", xff));
    assert_eq!(h.send(via("198.51.100.1")).await.status(), 200);
    // Another client behind the same proxy has its own cluster.
    assert_eq!(h.send(via("192.0.2.1")).await.status(), 200);
    // The same /24 as the first client: refused. A prepended spoof changes nothing.
    assert_eq!(h.send(via("198.51.100.9")).await.status(), 429);
    assert_eq!(
        h.send(via("8.8.8.8, 198.51.100.10, 10.0.0.7"))
            .await
            .status(),
        429
    );
    // The proxy's own cluster was never charged.
    assert_eq!(h.send(get(req("", "10.0.0.1"))).await.status(), 200);
}

#[tokio::test]
async fn prompt_features_set_the_cost() {
    let h = harness(token_policy(), |l| l);
    let res = h
        .send(get(req("k", "192.0.2.1").extension(features(100, 300))))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(int(&res, "x-ratelimit-remaining-tokens"), 600);
    drop(res); // no usage reported: the estimate stays charged
    let res = h
        .send(get(req("k", "192.0.2.1").extension(features(100, 600))))
        .await;
    assert_eq!(res.status(), 429);
    assert_eq!(int(&res, "x-ratelimit-remaining-tokens"), 600);
}

#[tokio::test]
async fn default_expected_output_applies_without_features() {
    let h = harness(token_policy(), |l| l.default_expected_output_tokens(250));
    let res = h.send(get(req("k", "192.0.2.1"))).await;
    assert_eq!(int(&res, "x-ratelimit-remaining-tokens"), 750);
}

// ---------------------------------------------------------------------------------------------
// Settlement and concurrency

/// Remaining tokens of key `k`, seen through a zero-cost request.
async fn tokens_left(h: &Harness) -> u64 {
    let res = h
        .send(get(req("k", "192.0.2.1").extension(features(0, 0))))
        .await;
    assert_eq!(res.status(), 200);
    int(&res, "x-ratelimit-remaining-tokens")
}

#[tokio::test]
async fn a_streamed_body_settles_when_the_stream_ends() {
    let h = harness(token_policy(), |l| l);
    let res = h
        .send(get(req("k", "192.0.2.1")
            .header("x-chunks", "3")
            .header("x-trailer", "10")
            .extension(features(0, 900))))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(int(&res, "x-ratelimit-remaining-tokens"), 100);
    let mut body = res.into_body();
    for i in 0..3 {
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), format!("chunk {i}\n"));
        // Not settled while the stream runs.
        assert_eq!(tokens_left(&h).await, 100);
    }
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(trailers["x-usage-output-tokens"], "10");
    assert!(body.frame().await.is_none());
    // Settled at the end of the stream, while the body is still alive: 10 of 900 kept.
    assert_eq!(tokens_left(&h).await, 990);
    drop(body);
    assert_eq!(tokens_left(&h).await, 990);
}

#[tokio::test]
async fn the_usage_extension_settles_and_a_trailer_wins_over_it() {
    let h = harness(token_policy(), |l| l);
    let res = h
        .send(get(req("k", "192.0.2.1")
            .header("x-usage", "200")
            .extension(features(0, 900))))
        .await;
    assert_eq!(text(res).await, "chunk 0\n");
    assert_eq!(tokens_left(&h).await, 800);
    h.clock.advance(Duration::from_secs(60)); // refill
    let res = h
        .send(get(req("k", "192.0.2.1")
            .header("x-usage", "200")
            .header("x-trailer", "50")
            .extension(features(0, 900))))
        .await;
    let _ = text(res).await;
    assert_eq!(tokens_left(&h).await, 950);
}

#[tokio::test]
async fn without_usage_the_estimate_stays_charged() {
    let h = harness(token_policy(), |l| l);
    let res = h
        .send(get(req("k", "192.0.2.1").extension(features(0, 900))))
        .await;
    let _ = text(res).await;
    assert_eq!(tokens_left(&h).await, 100);
}

#[tokio::test]
async fn a_body_dropped_early_settles_with_a_known_usage() {
    let h = harness(token_policy(), |l| l);
    let res = h
        .send(get(req("k", "192.0.2.1")
            .header("x-chunks", "3")
            .header("x-usage", "30")
            .extension(features(0, 900))))
        .await;
    let mut body = res.into_body();
    let _ = body.frame().await;
    assert_eq!(tokens_left(&h).await, 100);
    drop(body); // client went away mid-stream
    assert_eq!(tokens_left(&h).await, 970);
}

#[tokio::test]
async fn a_concurrency_slot_is_held_until_the_body_ends_or_is_dropped() {
    let mut p = bare();
    p.api_key = limits(&[("in_flight", LimitConfig::Concurrency { max: 1 })]);
    let h = harness(p, |l| l);
    let first = h
        .send(get(req("k", "192.0.2.1").header("x-chunks", "2")))
        .await;
    assert_eq!(first.status(), 200);
    // The response head is out, the body is not: the slot is still held.
    let res = h.send(get(req("k", "192.0.2.1"))).await;
    assert_eq!(res.status(), 429);
    assert_eq!(int(&res, "retry-after"), 1);
    assert!(text(res)
        .await
        .contains("\"violated-policies\":[\"in_flight\"]"));
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    // Dropped: released.
    drop(first);
    let second = h
        .send(get(req("k", "192.0.2.1").header("x-chunks", "2")))
        .await;
    assert_eq!(second.status(), 200);
    let mut body = second.into_body();
    assert!(body.frame().await.is_some());
    assert_eq!(h.send(get(req("k", "192.0.2.1"))).await.status(), 429);
    // Read to the end (body still alive): released.
    while body.frame().await.is_some() {}
    let third = h.send(get(req("k", "192.0.2.1"))).await;
    assert_eq!(third.status(), 200);
    drop(body);
    drop(third);
    // A response future dropped before completion (client gone) releases too.
    let mut svc = h.svc.clone();
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let pending = svc.call(get(req("k", "192.0.2.1")));
    assert_eq!(h.send(get(req("k", "192.0.2.1"))).await.status(), 429);
    drop(pending);
    assert_eq!(h.send(get(req("k", "192.0.2.1"))).await.status(), 200);
    assert_eq!(h.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn an_inner_error_releases_the_slot() {
    let mut p = bare();
    p.api_key = limits(&[("in_flight", LimitConfig::Concurrency { max: 1 })]);
    let warden = Arc::new(
        Warden::builder()
            .policy(p)
            .clock(ManualClock::new())
            .build()
            .unwrap(),
    );
    let failing =
        WardenLayer::new(warden.clone()).layer(service_fn(|_req: Request<String>| async {
            Err::<Response<String>, _>("upstream down")
        }));
    for _ in 0..3 {
        let err = failing.clone().oneshot(get(req("k", "192.0.2.1"))).await;
        assert_eq!(err.unwrap_err(), "upstream down");
    }
    assert_eq!(warden.stats().allowed, 3);
}

// ---------------------------------------------------------------------------------------------
// Behavioural denials, set by hand with `Warden::set_level`.

#[tokio::test]
async fn challenge_is_429_with_an_abnormal_usage_problem() {
    let h = harness(Policy::llm_api(), |l| l);
    h.warden
        .set_level(&SubjectId::api_key("sk-1"), Level::Challenge, None)
        .unwrap();
    let res = h.send(get(req("sk-1", "192.0.2.1"))).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&res, "content-type").unwrap(),
        "application/problem+json"
    );
    assert!(header(&res, "retry-after").is_none());
    let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#abnormal-usage-detected"
    );
    assert_eq!(body["title"], "Abnormal Usage Detected");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"][0], "challenge");
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn block_is_403() {
    let h = harness(Policy::llm_api(), |l| l);
    h.warden
        .set_level(&SubjectId::api_key("sk-1"), Level::Block, None)
        .unwrap();
    let res = h.send(get(req("sk-1", "192.0.2.1"))).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        text(res).await,
        "{\"type\":\"about:blank\",\"title\":\"Forbidden\",\"status\":403}"
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    // Other keys are served.
    assert_eq!(h.send(get(req("sk-2", "192.0.2.1"))).await.status(), 200);
}
