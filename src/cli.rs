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
