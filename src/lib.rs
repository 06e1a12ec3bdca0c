//! portcullis: a TLS-terminating reverse proxy that makes a plain-HTTP app
//! safe to expose. Start reading at [`pipeline::handle`]: it shows every step
//! a request goes through, in order.

pub mod access_log;
pub mod acme;
pub mod admin;
pub mod allocator;
pub mod background;
pub mod body;
pub mod cert_info;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod explain;
pub mod filters;
pub mod forward;
pub mod h2_flood;
pub mod linger;
pub mod outbound_tls;
pub mod path;
pub mod pipeline;
pub mod policy;
pub mod redirect;
pub mod redis_limits;
pub mod reject;
pub mod request_body;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod sniffer;
pub mod socket;
pub mod telemetry;
pub mod tls;
pub mod tls_random;
pub mod tunnel;
pub mod upstream;
