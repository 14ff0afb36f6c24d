//! Prometheus metrics: the registry, typed handles, and the closed label enums.
//!
//! Every label value comes from an enum mapped to a fixed string, never from a client or a
//! destination, so the number of series stays fixed whatever the traffic (denied hosts go to
//! the access log instead). Counter handles for every label combination are created up front:
//! the request path increments an atomic, with no label lookup.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// What kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Http,
    Local,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Connect, Kind::Http, Kind::Local];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Http => "http",
            Kind::Local => "local",
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed and served (whatever the upstream answered).
    Allowed,
    /// Refused by policy or by the destination guard.
    Denied,
    /// Failed: bad request, DNS, connect, upstream.
    Error,
    /// Refused by the allowlist but let through and served, because `CUTTLE_MODE=report`.
    WouldDeny,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Allowed,
        Outcome::Denied,
        Outcome::Error,
        Outcome::WouldDeny,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
            Outcome::WouldDeny => "would_deny",
        }
    }
}

/// Why a request ended as it did: the rule that allowed it, or what refused or failed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Allowed by an allowlist entry, or refused for lack of one.
    Allowlist,
    /// Allowed by `NO_WHITELIST=true`.
    NoWhitelist,
    /// A local endpoint.
    Local,
    /// The client is outside `ALLOWED_CIDRS`.
    ClientCidr,
    /// The port is not allowed for the method.
    Port,
    /// Every resolved address is refused by the destination guard.
    UpstreamAddress,
    BadRequest,
    NotImplemented,
    Dns,
    ConnectFailed,
    ConnectTimeout,
    /// `CUTTLE_MAX_PENDING_CONNECTS` reached for the destination.
    ConnectLimit,
    UpstreamFailed,
    /// No response head from upstream within `CUTTLE_IDLE_TIMEOUT`.
    UpstreamTimeout,
    /// The tunnel's TLS ClientHello failed the SNI check (`CUTTLE_SNI_CHECK`).
    Sni,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::Allowlist,
        Reason::NoWhitelist,
        Reason::Local,
        Reason::ClientCidr,
        Reason::Port,
        Reason::UpstreamAddress,
        Reason::BadRequest,
        Reason::NotImplemented,
        Reason::Dns,
        Reason::ConnectFailed,
        Reason::ConnectTimeout,
        Reason::ConnectLimit,
        Reason::UpstreamFailed,
        Reason::UpstreamTimeout,
        Reason::Sni,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Allowlist => "allowlist",
            Reason::NoWhitelist => "no_whitelist",
            Reason::Local => "local",
            Reason::ClientCidr => "client_cidr",
            Reason::Port => "port",
            Reason::UpstreamAddress => "upstream_address",
            Reason::BadRequest => "bad_request",
            Reason::NotImplemented => "not_implemented",
            Reason::Dns => "dns",
            Reason::ConnectFailed => "connect_failed",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::ConnectLimit => "connect_limit",
            Reason::UpstreamFailed => "upstream_failed",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::Sni => "sni",
        }
    }

    /// The outcome a reason belongs to when it ends a request, for the pairs that can occur.
    fn outcomes(self) -> &'static [Outcome] {
        match self {
            Reason::Allowlist => &[Outcome::Allowed, Outcome::Denied, Outcome::WouldDeny],
            Reason::NoWhitelist | Reason::Local => &[Outcome::Allowed],
            Reason::ClientCidr | Reason::Port | Reason::UpstreamAddress | Reason::Sni => {
                &[Outcome::Denied]
            }
            _ => &[Outcome::Error],
        }
    }
}

/// The slot of a (kind, outcome, reason) combination in `Metrics::request_handles`.
fn request_index(kind: Kind, outcome: Outcome, reason: Reason) -> usize {
    (kind as usize * Outcome::ALL.len() + outcome as usize) * Reason::ALL.len() + reason as usize
}

/// Latency buckets from 100 µs to 10 minutes: sub-millisecond local answers up to long
/// downloads and tunnels.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets for DNS and connect: 50 µs to 30 s.
const CONNECT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Direction of bytes.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

/// Why a connection was closed for its PROXY protocol header (`CUTTLE_PROXY_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocolRejection {
    /// A header from a peer outside `CUTTLE_PROXY_PROTOCOL_FROM`.
    Untrusted,
    /// A header that cannot be parsed, or that did not arrive whole in time.
    Malformed,
    /// No header in `required` mode.
    Missing,
}

impl ProxyProtocolRejection {
    pub const ALL: [ProxyProtocolRejection; 3] = [
        ProxyProtocolRejection::Untrusted,
        ProxyProtocolRejection::Malformed,
        ProxyProtocolRejection::Missing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ProxyProtocolRejection::Untrusted => "untrusted",
            ProxyProtocolRejection::Malformed => "malformed",
            ProxyProtocolRejection::Missing => "missing",
        }
    }
}

/// Result of a config reload.
#[derive(Clone, Copy, Debug)]
pub enum ReloadResult {
    Success,
    Failure,
}

/// All of cuttle's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// The handles of `requests`, indexed by [`request_index`]: no label lookup per request.
    request_handles: Vec<Option<IntCounter>>,
    /// The handles of `request_duration`, by `Kind as usize`.
    duration_handles: Vec<Histogram>,
    pub connections_active: IntGauge,
    pub connections_total: IntCounter,
    pub connections_rejected: IntCounter,
    pub tunnels_active: IntGauge,
    bytes_up: IntCounter,
    bytes_down: IntCounter,
    pub upstream_connect_seconds: Histogram,
    pub dns_lookup_seconds: Histogram,
    pub allowlist_entries: IntGauge,
    reloads: IntCounterVec,
    pub access_log_dropped: IntCounter,
    /// By [`ProxyProtocolRejection`], in the order of `ProxyProtocolRejection::ALL`.
    proxy_protocol_rejections: [IntCounter; 3],
}

impl Metrics {
    /// A registry with every metric registered and every label combination initialised to 0.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "cuttle_requests_total",
                "Requests and tunnels by kind, decision and reason.",
            ),
            &["kind", "decision", "reason"],
        )
        .expect("valid metric");
        let connections_active =
            IntGauge::new("cuttle_connections_active", "Client connections open now.")
                .expect("valid metric");
        let connections_total =
            IntCounter::new("cuttle_connections_total", "Client connections accepted.")
                .expect("valid metric");
        let connections_rejected = IntCounter::new(
            "cuttle_connections_rejected_total",
            "Client connections refused with 503 past CUTTLE_MAX_CONNECTIONS.",
        )
        .expect("valid metric");
        let tunnels_active = IntGauge::new("cuttle_tunnels_active", "CONNECT tunnels open now.")
            .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "cuttle_bytes_total",
                "Payload bytes relayed (bodies and tunnel data), by direction.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let upstream_connect_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cuttle_upstream_connect_seconds",
                "Time to connect to an upstream address.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let dns_lookup_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cuttle_dns_lookup_seconds",
                "Time to resolve a destination name (hosts file or DNS).",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "cuttle_request_duration_seconds",
                "Time from request to the end of the response or tunnel.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("valid metric");
        let allowlist_entries =
            IntGauge::new("cuttle_allowlist_entries", "Allowlist entries in force.")
                .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("cuttle_config_reloads_total", "Policy reloads by result."),
            &["result"],
        )
        .expect("valid metric");
        let access_log_dropped = IntCounter::new(
            "cuttle_access_log_dropped_total",
            "Access log lines dropped because stdout could not keep up.",
        )
        .expect("valid metric");
        let proxy_protocol_rejected_vec = IntCounterVec::new(
            Opts::new(
                "cuttle_proxy_protocol_rejected_total",
                "Connections closed for their PROXY protocol header, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let proxy_protocol_rejections = ProxyProtocolRejection::ALL
            .map(|reason| proxy_protocol_rejected_vec.with_label_values(&[reason.label()]));
        let build_info = IntGaugeVec::new(
            Opts::new("cuttle_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let mut request_handles =
            vec![None; Kind::ALL.len() * Outcome::ALL.len() * Reason::ALL.len()];
        for kind in Kind::ALL {
            for reason in Reason::ALL {
                for outcome in reason.outcomes() {
                    request_handles[request_index(kind, *outcome, reason)] =
                        Some(requests.with_label_values(&[
                            kind.label(),
                            outcome.label(),
                            reason.label(),
                        ]));
                }
            }
        }
        let bytes_up = bytes.with_label_values(&["client_to_upstream"]);
        let bytes_down = bytes.with_label_values(&["upstream_to_client"]);
        let duration_handles = Kind::ALL
            .iter()
            .map(|kind| request_duration.with_label_values(&[kind.label()]))
            .collect();
        reloads.with_label_values(&["success"]);
        reloads.with_label_values(&["failure"]);

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests.clone()),
            Box::new(connections_active.clone()),
            Box::new(connections_total.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(tunnels_active.clone()),
            Box::new(bytes),
            Box::new(upstream_connect_seconds.clone()),
            Box::new(dns_lookup_seconds.clone()),
            Box::new(request_duration),
            Box::new(allowlist_entries.clone()),
            Box::new(reloads.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(proxy_protocol_rejected_vec),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        Metrics {
            registry,
            requests,
            request_handles,
            duration_handles,
            connections_active,
            connections_total,
            connections_rejected,
            tunnels_active,
            bytes_up,
            bytes_down,
            upstream_connect_seconds,
            dns_lookup_seconds,
            allowlist_entries,
            reloads,
            access_log_dropped,
            proxy_protocol_rejections,
        }
    }

    /// Counts a connection closed for its PROXY protocol header.
    pub fn proxy_protocol_rejected(&self, reason: ProxyProtocolRejection) {
        let index = match reason {
            ProxyProtocolRejection::Untrusted => 0,
            ProxyProtocolRejection::Malformed => 1,
            ProxyProtocolRejection::Missing => 2,
        };
        self.proxy_protocol_rejections[index].inc();
    }

    /// Counts one finished request.
    pub fn request(&self, kind: Kind, outcome: Outcome, reason: Reason, duration: Duration) {
        match self
            .request_handles
            .get(request_index(kind, outcome, reason))
        {
            Some(Some(counter)) => counter.inc(),
            // A combination not created up front (not expected): the slow path still counts it.
            _ => self
                .requests
                .with_label_values(&[kind.label(), outcome.label(), reason.label()])
                .inc(),
        }
        if let Some(histogram) = self.duration_handles.get(kind as usize) {
            histogram.observe(duration.as_secs_f64());
        }
    }

    /// The byte counter of a direction.
    pub fn bytes(&self, direction: Direction) -> &IntCounter {
        match direction {
            Direction::ClientToUpstream => &self.bytes_up,
            Direction::UpstreamToClient => &self.bytes_down,
        }
    }

    /// Counts a reload.
    pub fn reload(&self, result: ReloadResult) {
        let label = match result {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        };
        self.reloads.with_label_values(&[label]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric of the contract is exposed from the start, with zeroed label sets.
    #[test]
    fn exposition_has_every_metric() {
        let m = Metrics::new();
        m.request(
            Kind::Http,
            Outcome::Denied,
            Reason::Allowlist,
            Duration::from_millis(2),
        );
        let text = m.render();
        for needle in [
            "cuttle_requests_total{decision=\"denied\",kind=\"http\",reason=\"allowlist\"} 1",
            "cuttle_requests_total{decision=\"allowed\",kind=\"connect\",reason=\"allowlist\"} 0",
            "cuttle_requests_total{decision=\"would_deny\",kind=\"connect\",reason=\"allowlist\"} 0",
            "cuttle_requests_total{decision=\"would_deny\",kind=\"http\",reason=\"allowlist\"} 0",
            "cuttle_connections_active 0",
            "cuttle_tunnels_active 0",
            "cuttle_connections_total 0",
            "cuttle_bytes_total{direction=\"client_to_upstream\"} 0",
            "cuttle_bytes_total{direction=\"upstream_to_client\"} 0",
            "cuttle_upstream_connect_seconds_bucket",
            "cuttle_dns_lookup_seconds_bucket",
            "cuttle_request_duration_seconds_bucket{kind=\"http\",le=\"0.0025\"} 1",
            "cuttle_allowlist_entries 0",
            "cuttle_config_reloads_total{result=\"failure\"} 0",
            "cuttle_access_log_dropped_total 0",
            "cuttle_proxy_protocol_rejected_total{reason=\"untrusted\"} 0",
            "cuttle_proxy_protocol_rejected_total{reason=\"missing\"} 0",
            "cuttle_requests_total{decision=\"denied\",kind=\"connect\",reason=\"sni\"} 0",
            "cuttle_build_info{version=",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
