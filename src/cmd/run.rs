//! `portcullis run`: load, validate, serve until SIGTERM.

use std::path::Path;

use super::Failure;

pub fn run(config_path: &Path) -> Result<(), Failure> {
    let config = crate::config::load(config_path)?;
    let _log = crate::telemetry::init(config.log.json, &config.log.level);
    crate::server::run(config)?;
    Ok(())
}
