//! End to end: the gateway example's server on an ephemeral loopback port, driven by a real
//! HTTP client with many concurrent requests. The warden's clock is frozen, so the number of
//! admitted requests is exact. Bounded by timeouts; the server is shut down at the end.

#[allow(dead_code)]
#[path = "../examples/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ratewarden::{Decision, ManualClock, Policy, Request, Warden};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Barrier};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

/// The request body every client sends.
const BODY: &str = r#"{"max_tokens":64,"messages":[{"role":"user","content":"hello"}]}"#;

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    trailers: Option<http::HeaderMap>,
    body: String,
}

/// Opens a connection, waits on `barrier`, then sends one completion request.
async fn send(addr: SocketAddr, key: Option<&str>, barrier: Arc<Barrier>) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    barrier.wait().await;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/chat/completions"))
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        // Ask for trailers, to see the usage trailer the model reports.
        .header("te", "trailers");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::from(BODY))).unwrap())
        .await
        .expect("response");
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    drop(sender);
    let _ = conn.await;
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        trailers,
        body: String::from_utf8(body.to_vec()).expect("utf-8"),
    }
}

fn int(r: &Reply, name: &str) -> u64 {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not an integer"))
}

/// The `r` and `t` parameters of each item of a `RateLimit` field, as integers.
fn ratelimit_items(r: &Reply) -> Vec<(String, u64, u64)> {
    let v = r.headers["ratelimit"].to_str().unwrap();
    v.split(", ")
        .map(|item| {
            let mut it = item.split(';');
            let name = it.next().unwrap().trim_matches('"').to_string();
            let (mut rem, mut reset) = (None, None);
            for p in it {
                let (k, v) = p.split_once('=').unwrap();
                let n: u64 = v.parse().expect("integer parameter");
                match k {
                    "r" => rem = Some(n),
                    "t" => reset = Some(n),
                    _ => {}
                }
            }
            (name, rem.expect("r"), reset.expect("t"))
        })
        .collect()
}

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(warden: Arc<Warden>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway::serve(
        listener,
        gateway::build_app(warden),
        async move {
            let _ = stopped.await;
        },
    ));
    Server { addr, stop, task }
}

impl Server {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        timeout(LIMIT, self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server ran");
    }
}

fn frozen_warden() -> Arc<Warden> {
    Arc::new(
        Warden::builder()
            .policy(Policy::llm_api())
            .clock(ManualClock::new())
            .build()
            .unwrap(),
    )
}

async fn burst(addr: SocketAddr, key: Option<&'static str>, n: usize) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(send(addr, key, barrier.clone())))
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_with_one_key_admit_exactly_the_burst() {
    let warden = frozen_warden();
    let server = start(warden.clone()).await;
    let replies = timeout(LIMIT, burst(server.addr, Some("sk-e2e"), 50))
        .await
        .expect("requests finish in time");

    let (ok, denied): (Vec<_>, Vec<_>) = replies.iter().partition(|r| r.status == 200);
    assert_eq!(ok.len(), 20, "the key's burst with a frozen clock");
    assert_eq!(denied.len(), 30);
    assert!(denied.iter().all(|r| r.status == 429));

    for r in &ok {
        let remaining = int(r, "x-ratelimit-remaining-requests");
        assert!(remaining < 20, "remaining {remaining}");
        assert_eq!(int(r, "x-ratelimit-limit-requests"), 20);
        let items = ratelimit_items(r);
        assert_eq!(items[0].0, "requests_per_minute");
        assert!(items[0].1 < 20);
        assert!(items.iter().any(|(n, _, _)| n == "tokens_per_minute"));
        assert!(r.headers.get("retry-after").is_none());
        assert!(r.body.starts_with("data: {\"choices\""), "{}", r.body);
        assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    }
    for r in &denied {
        assert_eq!(int(r, "retry-after"), 1);
        assert_eq!(int(r, "x-ratelimit-remaining-requests"), 0);
        let items = ratelimit_items(r);
        assert_eq!(items, vec![("requests_per_minute".to_string(), 0, 10)]);
        assert_eq!(
            r.headers["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        assert!(r.body.contains("#quota-exceeded"), "{}", r.body);
    }
    let stats = warden.stats();
    assert_eq!(stats.allowed, 20);
    assert_eq!(stats.denied_rate, 30);

    // Each streamed answer reported its output tokens in a trailer; once every connection
    // is closed, each permit has been settled to input + actual output.
    let used: Vec<u64> = ok
        .iter()
        .map(|r| {
            let t = r.trailers.as_ref().expect("trailers");
            t["x-usage-output-tokens"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(used.iter().all(|u| (1..=64).contains(u)), "{used:?}");
    server.shutdown().await;
    let input = (BODY.len() as u64).div_ceil(4);
    let spent: u64 = used.iter().map(|u| input + u).sum();
    let probe = Request::new("sk-e2e", "", "127.0.0.1".parse().unwrap()).requests(0);
    let remaining = match warden.check(&probe) {
        Decision::Allow(p) => p.rate_limit().tokens.expect("token limit").remaining,
        Decision::Deny(d) => panic!("probe denied: {}", d.reason()),
    };
    assert_eq!(remaining, 400_000 - spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_share_the_anonymous_bucket_of_the_loopback_cluster() {
    let warden = frozen_warden();
    let server = start(warden.clone()).await;
    let replies = timeout(LIMIT, burst(server.addr, None, 25))
        .await
        .expect("requests finish in time");
    // No `anonymous` limits in the preset: the api key limits apply to `anon:127.0.0.0/24`.
    assert_eq!(replies.iter().filter(|r| r.status == 200).count(), 20);
    // A keyed client from the same address still has its own bucket.
    let keyed = timeout(LIMIT, burst(server.addr, Some("sk-other"), 1))
        .await
        .expect("in time");
    assert_eq!(keyed[0].status, 200);
    server.shutdown().await;
}
