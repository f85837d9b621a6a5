//! An LLM API gateway: axum on 127.0.0.1, a fake model endpoint that streams its answer, and
//! the ratewarden tower layer in front of it with the `llm_api` preset.
//!
//! ```text
//! cargo run --example gateway --features tower -- [--port N]     # or PORT=N; default 0 (any)
//! ```
//!
//! It prints the bound address and a `curl` line to try, and stops on Ctrl-C.
//!
//! The request path: `prompt_features` (buffers the JSON body, estimates the cost and
//! fingerprints the prompt into a `PromptFeatures` extension) → `WardenLayer` (decides; a
//! denial is answered here) → `completions` (the fake model). The model streams a few chunks and
//! reports its actual output tokens in the `x-usage-output-tokens` trailer, which the layer
//! reads at the end of the stream to settle the token charge.
//!
//! `tests/gateway_e2e.rs` includes this file as a module and calls [`build_app`] and
//! [`serve`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use http_body::Frame;
use ratewarden::{Policy, PromptFeatures, Warden, WardenLayer};
use tokio::net::TcpListener;

/// Largest request body the gateway reads.
const MAX_BODY: usize = 1 << 20;
/// Output tokens charged up front when the request does not say `max_tokens`.
const DEFAULT_MAX_TOKENS: u64 = 256;
/// Chunks per streamed answer.
const CHUNKS: u64 = 4;

/// The gateway's router: the fake model behind the warden layer, with the prompt features
/// computed before it.
///
/// The peer address is read from axum's `ConnectInfo<SocketAddr>`, so serve the router with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does). No proxy is
/// trusted: the gateway faces clients directly.
pub(crate) fn build_app(warden: Arc<Warden>) -> Router {
    let layer = WardenLayer::new(warden).peer_addr(|parts| {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
    });
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .layer(layer)
        // Added last, so it runs first.
        .layer(axum::middleware::map_request(prompt_features))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains open connections.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// A 64-bit fingerprint of `bytes` (SipHash with fixed keys: fine for a demo; a real gateway
/// would use a keyed hash and a normalised prompt).
fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Reads the JSON body (up to 1 MiB) and attaches the request's cost and prompt fingerprint.
async fn prompt_features(req: Request) -> Result<Request, StatusCode> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let max_tokens = json
        .get("max_tokens")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .min(4096);
    let mut f = PromptFeatures::default();
    f.input_tokens = (bytes.len() as u64).div_ceil(4); // about four bytes a token
    f.expected_output_tokens = max_tokens;
    f.logprobs = json
        .get("logprobs")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    if let Some(messages) = json.get("messages") {
        f.prompt_fp = Some(fingerprint(messages.to_string().as_bytes()));
    }
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(f);
    Ok(req)
}

/// The fake model: answers a simulated number of tokens, streamed in a few chunks, and
/// reports them in the `x-usage-output-tokens` trailer.
async fn completions(req: Request) -> Response {
    let f = req
        .extensions()
        .get::<PromptFeatures>()
        .copied()
        .unwrap_or_default();
    let tokens = (f.prompt_fp.unwrap_or(0) % 200 + 20).min(f.expected_output_tokens.max(1));
    let mut chunks = VecDeque::new();
    for i in 0..CHUNKS {
        let n = tokens / CHUNKS + u64::from(i < tokens % CHUNKS);
        let words = vec!["tok"; usize::try_from(n).unwrap_or(0)].join(" ");
        chunks.push_back(Bytes::from(format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{words}\"}}}}]}}\n\n"
        )));
    }
    chunks.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    let mut res = Response::new(Body::new(Completion {
        chunks,
        tokens,
        trailers_sent: false,
    }));
    let h = res.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    // Announce the trailer; clients that send `TE: trailers` receive it.
    h.insert("trailer", HeaderValue::from_static("x-usage-output-tokens"));
    res
}

/// A streamed answer: its chunks, then a trailer with the output tokens.
struct Completion {
    chunks: VecDeque<Bytes>,
    tokens: u64,
    trailers_sent: bool,
}

impl http_body::Body for Completion {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(c) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if this.trailers_sent {
            return Poll::Ready(None);
        }
        this.trailers_sent = true;
        let mut t = HeaderMap::new();
        t.insert("x-usage-output-tokens", HeaderValue::from(this.tokens));
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }
}

/// `--port N`, `--port=N`, or the `PORT` environment variable; 0 (any free port) by default.
fn port() -> Result<u16, String> {
    let mut args = std::env::args().skip(1);
    let mut value = std::env::var("PORT").ok();
    while let Some(a) = args.next() {
        if a == "--port" {
            value = Some(args.next().ok_or("--port needs a value")?);
        } else if let Some(v) = a.strip_prefix("--port=") {
            value = Some(v.to_string());
        } else {
            return Err(format!("unknown argument `{a}`; usage: gateway [--port N]"));
        }
    }
    match value {
        None => Ok(0),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("invalid port `{v}`: expected 0..=65535")),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = port()?;
    let warden = Arc::new(Warden::builder().policy(Policy::llm_api()).build()?);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let addr = listener.local_addr()?;
    println!("ratewarden gateway listening on http://{addr}");
    println!(
        "try: curl -sN -i http://{addr}/v1/chat/completions -H 'authorization: Bearer sk-demo' -H 'te: trailers' \
         -d '{{\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!("(the key's burst is 20 requests; send 21 quickly to see a 429)");
    serve(listener, build_app(warden), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    println!("stopped");
    Ok(())
}
