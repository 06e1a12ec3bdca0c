//! One file per command. Each returns a [`Failure`] that `main` maps to the
//! exit status SPEC defines: 2 for configuration or usage, 1 for anything else.

pub mod check;
pub mod demo;
pub mod explain;
pub mod gen_cert;
pub mod mock_upstream;
pub mod run;
pub mod token;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::ConfigError;

#[derive(Debug)]
pub enum Failure {
    Config(ConfigError),
    Usage(String),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Other(e.into())
    }
}

pub fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run::run(&cli.config),
        Command::Check => check::check(&cli.config),
        Command::Demo => demo::demo(&cli.config),
        Command::MockUpstream { listen } => mock_upstream_main(listen),
        Command::GenCert { out, hosts, force } => gen_cert::gen_cert(&out, &hosts, force),
        Command::Explain {
            method,
            url,
            headers,
            token,
            body_file,
            client,
            json,
            online,
            expect,
        } => match expect {
            Some(cases) => explain::expect(&cli.config, &cases, online),
            None => explain::explain(
                &cli.config,
                explain::Args {
                    method: method.unwrap_or_default(),
                    url: url.unwrap_or_default(),
                    headers,
                    token,
                    body_file,
                    client,
                    json,
                    online,
                },
            ),
        },
        Command::Token {
            sub,
            scope,
            ttl,
            claims,
            key,
        } => token::token(&cli.config, &sub, scope, &ttl, &claims, key.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn mock_upstream_main(listen: std::net::SocketAddr) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(mock_upstream::run(listen))?;
    Ok(())
}
