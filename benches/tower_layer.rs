//! Overhead of the tower layer per request, against the bare service, without a network: the
//! service is polled by hand with a no-op waker (every future here is ready at once), and the
//! response body is read to its end.
//!
//! ```text
//! cargo bench --features tower --bench tower_layer
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::body::Bytes;
use criterion::{black_box, BatchSize, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use ratewarden::{
    Decision, LimitConfig, OrgId, PeerAddr, Period, Policy, PromptFeatures, Usage, Warden,
    WardenLayer,
};
use tower::{Layer, Service};

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Calls `svc` once and reads the response body to its end; returns the status and the
/// number of frames.
fn drive<S, B>(svc: &mut S, cx: &mut Context<'_>, req: Request<()>) -> (u16, usize)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
{
    match svc.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("not ready"),
    }
    let fut = pin!(svc.call(req));
    let res = match fut.poll(cx) {
        Poll::Ready(Ok(r)) => r,
        _ => panic!("not ready"),
    };
    let status = res.status().as_u16();
    let mut body = pin!(res.into_body());
    let mut frames = 0;
    while let Poll::Ready(Some(Ok(_))) = body.as_mut().poll_frame(cx) {
        frames += 1;
    }
    (status, frames)
}

/// The model: a fixed response, optionally with a usage extension.
#[derive(Clone, Copy)]
struct Fixed {
    usage: bool,
}

impl Service<Request<()>> for Fixed {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        let mut res = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
        if self.usage {
            res.extensions_mut().insert(Usage::new(120));
        }
        ready(Ok(res))
    }
}

fn limits(pairs: &[(&str, LimitConfig)]) -> BTreeMap<String, LimitConfig> {
    pairs
        .iter()
        .map(|(n, l)| ((*n).to_string(), l.clone()))
        .collect()
}

/// The `llm_api` shape (3 subjects, requests and tokens) with limits nothing here reaches.
fn roomy() -> Policy {
    let sec = Period(Duration::from_secs(1));
    let rpm = LimitConfig::Gcra {
        rate: 1_000_000_000,
        period: sec,
        burst: 1_000_000_000,
    };
    let tpm = LimitConfig::Tokens {
        tokens: 1_000_000_000_000,
        period: Period(Duration::from_secs(3600)),
        burst: None,
    };
    let mut p = Policy::empty();
    p.behavior.enabled = false;
    p.api_key = limits(&[("requests", rpm.clone()), ("tokens", tpm.clone())]);
    p.org = limits(&[("requests", rpm.clone()), ("tokens", tpm)]);
    p.ip_cluster = limits(&[("requests", rpm)]);
    p
}

fn request(xff: bool) -> Request<()> {
    let mut f = PromptFeatures::default();
    f.input_tokens = 400;
    f.expected_output_tokens = 800;
    let peer: SocketAddr = if xff {
        "10.0.0.1:5000".parse().unwrap()
    } else {
        "198.51.100.23:5000".parse().unwrap()
    };
    let mut b = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("authorization", "Bearer sk-proj-bench")
        .extension(PeerAddr(peer))
        .extension(OrgId("org-bench".into()))
        .extension(f);
    if xff {
        b = b.header("x-forwarded-for", "203.0.113.9, 198.51.100.23, 10.0.0.2");
    }
    b.body(()).unwrap()
}

fn bench(c: &mut Criterion) {
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut g = c.benchmark_group("tower_layer");
    g.throughput(Throughput::Elements(1));

    let mut bare = Fixed { usage: false };
    g.bench_function("bare_service", |b| {
        b.iter_batched(
            || request(false),
            |req| black_box(drive(&mut bare, &mut cx, req)),
            BatchSize::SmallInput,
        )
    });

    let warden = Arc::new(Warden::builder().policy(roomy()).build().unwrap());
    g.bench_function("warden_check_with_headers", |b| {
        let ip = "198.51.100.23".parse().unwrap();
        b.iter(|| {
            let req = ratewarden::Request::new("sk-proj-bench", "org-bench", ip)
                .input_tokens(400)
                .expected_output_tokens(800);
            match warden.check(black_box(&req)) {
                Decision::Allow(p) => black_box(p.headers().len()),
                Decision::Deny(_) => unreachable!(),
            }
        })
    });

    g.bench_function("warden_check_no_headers", |b| {
        let ip = "198.51.100.23".parse().unwrap();
        b.iter(|| {
            let req = ratewarden::Request::new("sk-proj-bench", "org-bench", ip)
                .input_tokens(400)
                .expected_output_tokens(800);
            black_box(warden.check(black_box(&req)).is_allowed())
        })
    });

    let mut layered = WardenLayer::new(warden.clone()).layer(Fixed { usage: false });
    g.bench_function("layer_allow", |b| {
        b.iter_batched(
            || request(false),
            |req| {
                let out = drive(&mut layered, &mut cx, req);
                assert_eq!(out.0, 200);
                black_box(out)
            },
            BatchSize::SmallInput,
        )
    });

    let mut settling = WardenLayer::new(warden.clone()).layer(Fixed { usage: true });
    g.bench_function("layer_allow_settle", |b| {
        b.iter_batched(
            || request(false),
            |req| black_box(drive(&mut settling, &mut cx, req)),
            BatchSize::SmallInput,
        )
    });

    let mut proxied = WardenLayer::new(warden.clone())
        .trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .layer(Fixed { usage: false });
    g.bench_function("layer_allow_trusted_proxy", |b| {
        b.iter_batched(
            || request(true),
            |req| black_box(drive(&mut proxied, &mut cx, req)),
            BatchSize::SmallInput,
        )
    });

    let mut tight = Policy::empty();
    tight.behavior.enabled = false;
    tight.api_key = limits(&[(
        "requests",
        LimitConfig::Gcra {
            rate: 1,
            period: Period(Duration::from_secs(3600)),
            burst: 1,
        },
    )]);
    let denying = Arc::new(Warden::builder().policy(tight).build().unwrap());
    let mut denied = WardenLayer::new(denying).layer(Fixed { usage: false });
    assert_eq!(drive(&mut denied, &mut cx, request(false)).0, 200);
    g.bench_function("layer_deny_429", |b| {
        b.iter_batched(
            || request(false),
            |req| {
                let out = drive(&mut denied, &mut cx, req);
                assert_eq!(out.0, 429);
                black_box(out)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
