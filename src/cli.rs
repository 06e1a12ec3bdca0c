//! The command line (clap definitions only; the commands live in `cmd/`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A TLS-terminating reverse proxy that makes a plain-HTTP app safe to expose"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "PORTCULLIS_CONFIG",
        default_value = "proxy.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Load and validate the whole configuration, print a summary, change nothing.
    Check,
    /// Generate a dev certificate if needed, start the mock upstream and the proxy, print curl commands.
    Demo,
    /// A small plain-HTTP app that describes each request, to put behind the proxy.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: SocketAddr,
    },
    /// Write a self-signed development certificate and key (ECDSA P-256), valid from one hour ago to 90 days from now.
    GenCert {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// A name for the certificate (repeatable). Default: localhost, 127.0.0.1, ::1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Replace an existing certificate and key.
        #[arg(long)]
        force: bool,
    },
    /// Show what the proxy would do with one request (path, route, each policy's verdict, what the upstream receives), or run a file of expected outcomes; starts no listener and contacts nothing.
    Explain {
        /// The request's method (GET, POST, ...).
        #[arg(required_unless_present = "expect")]
        method: Option<String>,
        /// `/path?query` or `https://host/path?query` (its host becomes the Host header).
        #[arg(required_unless_present = "expect")]
        url: Option<String>,
        /// A request header `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// A JWT, sent as `Authorization: Bearer`.
        #[arg(long)]
        token: Option<String>,
        /// The request body, from this file.
        #[arg(long)]
        body_file: Option<PathBuf>,
        /// The client's address (default 127.0.0.1).
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fetch `jwt.jwks_url` to verify tokens (otherwise nothing is contacted).
        #[arg(long)]
        online: bool,
        /// A TOML file of requests and the outcome each must have; prints one line per case and exits 0 only if all pass.
        #[arg(long, conflicts_with_all = ["method", "url"])]
        expect: Option<PathBuf>,
    },
    /// Print a signed JWT accepted by the configured [jwt] verifier (HS*: with the secret_env variable unset, the secret `demo` keeps in certs/demo-jwt-secret.key).
    Token {
        #[arg(long)]
        sub: String,
        /// Space-separated scopes, put in the `scope` claim.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// An extra claim `k=v` (repeatable); `v` is read as JSON when it parses, else as a string.
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Private key PEM for asymmetric algorithms.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}
