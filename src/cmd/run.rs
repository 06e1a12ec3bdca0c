//! `portcullis run`: load, validate, serve until SIGTERM.

use std::path::Path;

use super::Failure;

pub fn run(config_path: &Path) -> Result<(), Failure> {
    let config = crate::config::load(config_path)?;
    let _log = crate::telemetry::init(config.log.json, &config.log.level);
    warn_unbuilt(&config);
    crate::server::run(config)?;
    Ok(())
}

/// Sections this version parses but does not act on yet are said out loud.
pub fn warn_unbuilt(config: &crate::config::Config) {
    if config.redis.is_some() {
        tracing::warn!(
            "[redis] is not built yet in this version: each instance keeps its own rate-limit state"
        );
    }
}
