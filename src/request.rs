//! The borrowed view of one request that the gateway fills in.

use std::net::IpAddr;

/// One API request as the warden sees it: who sent it, what it is expected to cost, and
/// optional prompt features for the behavioural layer. The library never sees prompt text.
///
/// Building a `Request` does not allocate.
///
/// # Examples
///
/// ```
/// use ratewarden::Request;
/// use std::net::IpAddr;
///
/// let ip: IpAddr = "198.51.100.23".parse().unwrap();
/// let req = Request::new("sk-proj-abc", "org-acme", ip)
///     .input_tokens(412)
///     .expected_output_tokens(800)
///     .prompt_fp(0x9f86_d081_884c_7d65)
///     .logprobs(false);
/// assert_eq!(req.token_cost(), Some(1212));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub(crate) api_key: Option<&'a str>,
    pub(crate) org: Option<&'a str>,
    pub(crate) ip: IpAddr,
    pub(crate) requests: u64,
    pub(crate) input_tokens: u64,
    pub(crate) expected_output_tokens: u64,
    pub(crate) prompt_fp: Option<u64>,
    pub(crate) prompt_simhash: Option<u64>,
    pub(crate) template_fp: Option<u64>,
    pub(crate) logprobs: bool,
    pub(crate) model: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A request from `api_key`, owned by `org`, sent from `ip`, costing one request and no
    /// tokens until you say otherwise. An empty `org` means "no org": the org subject is skipped.
    pub fn new(api_key: &'a str, org: &'a str, ip: IpAddr) -> Self {
        Self {
            api_key: Some(api_key),
            org: if org.is_empty() { None } else { Some(org) },
            ip,
            requests: 1,
            input_tokens: 0,
            expected_output_tokens: 0,
            prompt_fp: None,
            prompt_simhash: None,
            template_fp: None,
            logprobs: false,
            model: None,
        }
    }

    /// A request that carries no API key. It is charged to the anonymous key of its IP
    /// cluster (`anon:<cidr>`), which has the policy's `anonymous` limits, and to the cluster
    /// itself. It is never a free pass.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratewarden::Request;
    /// let req = Request::anonymous("203.0.113.9".parse().unwrap());
    /// assert_eq!(req.api_key(), None);
    /// ```
    pub fn anonymous(ip: IpAddr) -> Self {
        let mut r = Self::new("", "", ip);
        r.api_key = None;
        r
    }

    /// The request cost in requests (default 1). Zero is allowed and charges nothing.
    pub fn requests(mut self, n: u64) -> Self {
        self.requests = n;
        self
    }

    /// Prompt tokens, known when the request arrives.
    pub fn input_tokens(mut self, n: u64) -> Self {
        self.input_tokens = n;
        self
    }

    /// The output tokens charged up front; [`Permit::settle`](crate::Permit::settle) corrects it
    /// to the actual number.
    pub fn expected_output_tokens(mut self, n: u64) -> Self {
        self.expected_output_tokens = n;
        self
    }

    /// Exact 64-bit hash of the prompt.
    pub fn prompt_fp(mut self, fp: u64) -> Self {
        self.prompt_fp = Some(fp);
        self
    }

    /// 64-bit SimHash of the prompt: near prompts differ in few bits.
    pub fn prompt_simhash(mut self, sim: u64) -> Self {
        self.prompt_simhash = Some(sim);
        self
    }

    /// 64-bit hash of the prompt's template or system prompt.
    pub fn template_fp(mut self, fp: u64) -> Self {
        self.template_fp = Some(fp);
        self
    }

    /// Whether token log-probabilities were requested.
    pub fn logprobs(mut self, on: bool) -> Self {
        self.logprobs = on;
        self
    }

    /// The model name (informational).
    pub fn model(mut self, model: &'a str) -> Self {
        self.model = Some(model);
        self
    }

    /// The API key, or `None` for an anonymous request.
    pub fn api_key(&self) -> Option<&'a str> {
        self.api_key
    }

    /// The organisation, if any.
    pub fn org(&self) -> Option<&'a str> {
        self.org
    }

    /// The client address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Input plus expected output tokens, or `None` if the sum overflows `u64`
    /// (such a request is denied, never wrapped).
    pub fn token_cost(&self) -> Option<u64> {
        self.input_tokens.checked_add(self.expected_output_tokens)
    }
}
