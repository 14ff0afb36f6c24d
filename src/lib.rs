//! cuttle: an allowlisting egress forward proxy for AWS VPCs, a drop-in replacement for the
//! Squid egress image (same environment variables, same decisions, Squid-compatible errors).
//!
//! # Layout
//!
//! The policy is pure: `settings`, `host`, `allowlist`, `client_acl`, `netset`, `guard` and
//! `policy` do no I/O and never import the I/O modules, so they are unit-tested (and fuzzed) on
//! their own. The I/O modules call [`policy::Policy::decide`] once per request and never
//! re-implement a rule.
//!
//! | module | provides |
//! |---|---|
//! | [`settings`] | layered config (defaults < file < `CUTTLE_*` < Squid names < flags) validated into `Settings` |
//! | [`host`] | host normalisation: case, trailing dot, IDNA, IP literals |
//! | [`allowlist`] | destination rules: exact names, suffixes, globs, IP/CIDR entries, AWS regional defaults |
//! | [`client_acl`] | client networks (`ALLOWED_CIDRS`), canonical client addresses |
//! | [`netset`] | longest-prefix IP network sets shared by the CIDR checks |
//! | [`guard`] | the destination address guard (metadata service, loopback, link-local, ...) |
//! | [`policy`] | request targets and the decision over (client, request) |
//! | [`resolve`] | hosts file, async DNS with cache, dialling guarded addresses only |
//! | [`server`] | listeners, worker threads (a single-threaded runtime each) and their balance, accept loops, connection limit, the client socket (activity clock and framing watch), per-connection tasks, drain |
//! | [`framing`] | the request framing watch: `Content-Length` with `Transfer-Encoding` is refused |
//! | [`proxy_protocol`] | PROXY protocol v1/v2 headers from trusted load balancers: the real client address |
//! | [`proxy`] | the request path: classify, decide, then tunnel / forward / local |
//! | [`tunnel`] | `CONNECT` |
//! | [`sni`] | the TLS SNI check on tunnels: ClientHello `server_name` against the CONNECT host or the allowlist |
//! | [`copy`] | tunnel byte relay: one readiness-polling future, burst copy through a per-thread buffer, splice(2) for bulk on Linux |
//! | [`forward`] | plain HTTP forwarding |
//! | [`pool`] | each worker's keep-alive pool of upstream connections |
//! | [`local`] | `/healthz`, `/metrics` |
//! | [`metrics`] | the Prometheus registry, typed handles, closed label enums |
//! | [`access_log`] | Squid and JSON access log lines, the non-blocking writer task |
//! | [`transaction`] | one request's bookkeeping: decision, bytes, upstream, timings, then metrics and log |
//! | [`error`] | `ProxyError` and its one mapping to responses |
//! | [`idle`] | the activity clock behind `CUTTLE_IDLE_TIMEOUT` |
//! | [`commands`] | the operator subcommands: `check`, `config`, `healthcheck`, `report` |
//! | [`signals`] | SIGTERM / SIGINT |
//! | [`reload`] | SIGHUP and file changes: rebuild the policy, swap it in atomically |

#![forbid(unsafe_code)]

pub mod access_log;
pub mod allowlist;
pub mod client_acl;
pub mod commands;
pub mod copy;
pub mod error;
pub mod forward;
pub mod framing;
pub mod guard;
pub mod host;
pub mod idle;
pub mod local;
pub mod metrics;
pub mod netset;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod resolve;
pub mod server;
pub mod settings;
pub mod signals;
pub mod sni;
pub mod transaction;
pub mod tunnel;
